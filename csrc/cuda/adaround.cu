// AdaRound on CUDA: fused soft-rounding forward, its gradient with respect to V, and the rounding
// regulariser with its gradient (the hot path of BRECQ's reconstruction loop). Same formulas as
// csrc/cpu/adaround.cpp and brecq_ext/reference.py.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "brecq/format.h"
#include "cuda_kernels.h"

namespace brecq {
namespace cuda {
namespace {

constexpr float kZeta = 1.1f;
constexpr float kGamma = -0.1f;
constexpr int kThreads = 256;

struct Element {
  float s, z, sig, pre, h;
};

__device__ inline Element element(const float* w, const float* v, const uint16_t* scale, const uint8_t* zero,
                                  int64_t i, int64_t k, int64_t g, int64_t groups) {
  const int64_t row = i / k, grp = row * groups + (i - row * k) / g;
  Element e;
  e.s = __half2float(__ushort_as_half(scale[grp]));
  e.z = static_cast<float>(zero[grp]);
  e.sig = 1.0f / (1.0f + expf(-v[i]));
  e.pre = e.sig * (kZeta - kGamma) + kGamma;
  e.h = fminf(fmaxf(e.pre, 0.0f), 1.0f);
  return e;
}

__device__ inline float rectified_grad(const Element& e) {
  return (e.pre < 0.0f || e.pre > 1.0f) ? 0.0f : (kZeta - kGamma) * e.sig * (1.0f - e.sig);
}

__global__ void forward_kernel(const float* __restrict__ w, const float* __restrict__ v,
                               const uint16_t* __restrict__ scale, const uint8_t* __restrict__ zero, int64_t total,
                               int64_t k, int64_t g, int64_t groups, float qmax, float* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Element e = element(w, v, scale, zero, i, k, g, groups);
    const float q = floorf(w[i] / e.s) + e.h + e.z;
    out[i] = (fminf(fmaxf(q, 0.0f), qmax) - e.z) * e.s;
  }
}

__global__ void backward_kernel(const float* __restrict__ grad_out, const float* __restrict__ w,
                                const float* __restrict__ v, const uint16_t* __restrict__ scale,
                                const uint8_t* __restrict__ zero, int64_t total, int64_t k, int64_t g,
                                int64_t groups, float qmax, float* __restrict__ grad_v) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Element e = element(w, v, scale, zero, i, k, g, groups);
    const float q = floorf(w[i] / e.s) + e.h + e.z;
    grad_v[i] = (q >= 0.0f && q <= qmax) ? grad_out[i] * e.s * rectified_grad(e) : 0.0f;
  }
}

__global__ void regularizer_kernel(const float* __restrict__ v, int64_t total, float beta,
                                   float* __restrict__ grad_v, float* __restrict__ loss) {
  __shared__ float partial[kThreads];
  float sum = 0.0f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float sig = 1.0f / (1.0f + expf(-v[i]));
    const float pre = sig * (kZeta - kGamma) + kGamma;
    const float centred = 2.0f * fminf(fmaxf(pre, 0.0f), 1.0f) - 1.0f;
    const float magnitude = fabsf(centred);
    sum += 1.0f - powf(magnitude, beta);
    const float dpow = magnitude > 0.0f ? beta * powf(magnitude, beta - 1.0f) : 0.0f;
    const float sign = centred > 0.0f ? 1.0f : (centred < 0.0f ? -1.0f : 0.0f);
    const float dh = (pre < 0.0f || pre > 1.0f) ? 0.0f : (kZeta - kGamma) * sig * (1.0f - sig);
    grad_v[i] = -dpow * sign * 2.0f * dh;
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) atomicAdd(loss, partial[0]);
}

unsigned grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

}  // namespace

cudaError_t adaround_forward(const float* w, const float* v, const uint16_t* scale, const uint8_t* zero,
                             int64_t n, int64_t k, int bits, int64_t g, float* out, cudaStream_t stream) {
  const int64_t total = n * k;
  forward_kernel<<<grid_for(total), kThreads, 0, stream>>>(w, v, scale, zero, total, k, g, num_groups(k, g),
                                                           static_cast<float>(max_code(bits)), out);
  return cudaGetLastError();
}

cudaError_t adaround_backward(const float* grad_out, const float* w, const float* v, const uint16_t* scale,
                              const uint8_t* zero, int64_t n, int64_t k, int bits, int64_t g, float* grad_v,
                              cudaStream_t stream) {
  const int64_t total = n * k;
  backward_kernel<<<grid_for(total), kThreads, 0, stream>>>(grad_out, w, v, scale, zero, total, k, g,
                                                            num_groups(k, g), static_cast<float>(max_code(bits)),
                                                            grad_v);
  return cudaGetLastError();
}

cudaError_t adaround_regularizer(const float* v, int64_t count, float beta, float* grad_v, float* loss,
                                 cudaStream_t stream) {
  cudaError_t status = cudaMemsetAsync(loss, 0, sizeof(float), stream);
  if (status != cudaSuccess) return status;
  regularizer_kernel<<<grid_for(count), kThreads, 0, stream>>>(v, count, beta, grad_v, loss);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace brecq
