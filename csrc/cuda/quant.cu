// CUDA quantization kernels: per-group parameters (min-max and the MSE shrink search), quantize,
// dequantize, fake-quantize, pack and unpack. They follow csrc/cpu/quant.cpp and csrc/cpu/pack.cpp
// operation for operation; the *_rn intrinsics keep nvcc from fusing a multiply and an add into
// one FMA, which would round differently from the CPU kernels and the PyTorch reference.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "brecq/format.h"
#include "cuda_kernels.h"

namespace brecq {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr float kMinScale = 5.9604644775390625e-08f;  // smallest float16 subnormal, 2^-24
constexpr float kMaxScale = 65504.0f;                  // largest finite float16

unsigned blocks_for(int64_t total) { return static_cast<unsigned>((total + kThreads - 1) / kThreads); }

__device__ inline float half_bits_to_float(uint16_t h) { return __half2float(__ushort_as_half(h)); }

// float16 scale >= s, so that qmax * scale still covers the range after rounding.
__device__ inline uint16_t scale_round_up(float s) {
  s = fminf(fmaxf(s, kMinScale), kMaxScale);
  uint16_t h = __half_as_ushort(__float2half_rn(s));
  if (half_bits_to_float(h) < s) h = static_cast<uint16_t>(h + 1);
  return h;
}

struct GroupParams {
  uint16_t scale_bits;
  float scale;
  float zero;
};

__device__ inline GroupParams params_for_range(float lo, float hi, float qmax) {
  GroupParams p;
  p.scale_bits = scale_round_up(__fdiv_rn(__fsub_rn(hi, lo), qmax));
  p.scale = half_bits_to_float(p.scale_bits);
  p.zero = fminf(fmaxf(rintf(__fdiv_rn(-lo, p.scale)), 0.0f), qmax);
  return p;
}

__device__ inline float quantize_one(float w, float scale, float zero, float qmax) {
  return fminf(fmaxf(__fadd_rn(rintf(__fdiv_rn(w, scale)), zero), 0.0f), qmax);
}

__device__ inline float dequantize_one(float q, float scale, float zero) {
  return __fmul_rn(__fsub_rn(q, zero), scale);
}

// One thread per (row, group): the squared error is summed in the CPU kernel's order, so both pick
// the same shrink factor.
__global__ void quant_params_kernel(const float* __restrict__ w, int64_t n, int64_t k, int64_t g,
                                    int64_t groups, float qmax, int search_steps,
                                    uint16_t* __restrict__ scale, uint8_t* __restrict__ zero) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * groups) return;
  const int64_t row = idx / groups, grp = idx - row * groups;
  const float* wg = w + row * k + grp * g;
  const int64_t len = min(g, k - grp * g);
  float lo = 0.0f, hi = 0.0f;
  for (int64_t i = 0; i < len; ++i) {
    lo = fminf(lo, wg[i]);
    hi = fmaxf(hi, wg[i]);
  }
  GroupParams best = params_for_range(lo, hi, qmax);
  float best_err = __int_as_float(0x7f800000);  // +inf
  for (int step = 0; step < search_steps; ++step) {
    const float factor = __fsub_rn(1.0f, __fmul_rn(0.01f, static_cast<float>(step)));
    const GroupParams cand = params_for_range(__fmul_rn(lo, factor), __fmul_rn(hi, factor), qmax);
    float err = 0.0f;
    for (int64_t i = 0; i < len; ++i) {
      const float d = __fsub_rn(wg[i], dequantize_one(quantize_one(wg[i], cand.scale, cand.zero, qmax),
                                                      cand.scale, cand.zero));
      err = __fadd_rn(err, __fmul_rn(d, d));
    }
    if (err < best_err) {
      best_err = err;
      best = cand;
    }
  }
  scale[idx] = best.scale_bits;
  zero[idx] = static_cast<uint8_t>(best.zero);
}

enum class Elementwise { kQuantize, kDequantize, kFakeQuantize };

// One thread per weight; consecutive threads take consecutive weights of a row (coalesced).
template <Elementwise kOp>
__global__ void elementwise_kernel(const float* __restrict__ w, const uint8_t* __restrict__ codes,
                                   const uint16_t* __restrict__ scale, const uint8_t* __restrict__ zero,
                                   int64_t n, int64_t k, int64_t g, int64_t groups, float qmax,
                                   uint8_t* __restrict__ codes_out, float* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * k) return;
  const int64_t row = idx / k;
  const int64_t grp = row * groups + (idx - row * k) / g;
  const float s = half_bits_to_float(scale[grp]);
  const float z = static_cast<float>(zero[grp]);
  if constexpr (kOp == Elementwise::kQuantize) {
    codes_out[idx] = static_cast<uint8_t>(quantize_one(w[idx], s, z, qmax));
  } else if constexpr (kOp == Elementwise::kDequantize) {
    out[idx] = dequantize_one(static_cast<float>(codes[idx]), s, z);
  } else {
    out[idx] = dequantize_one(quantize_one(w[idx], s, z, qmax), s, z);
  }
}

// One thread per packed byte: it gathers the bits of the (at most three) codes that overlap it.
__global__ void pack_kernel(const uint8_t* __restrict__ codes, int64_t n, int64_t k, int bits,
                            int64_t row_bytes, uint8_t* __restrict__ packed) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * row_bytes) return;
  const int64_t row = idx / row_bytes;
  const int64_t first_bit = (idx - row * row_bytes) * 8;
  const uint8_t* src = codes + row * k;
  uint32_t byte = 0;
  for (int64_t c = first_bit / bits; c * bits < first_bit + 8; ++c) {
    const uint32_t code = c < k ? src[c] : 0u;
    const int64_t shift = c * bits - first_bit;
    byte |= shift >= 0 ? code << shift : code >> -shift;
  }
  packed[idx] = static_cast<uint8_t>(byte & 0xffu);
}

__global__ void unpack_kernel(const uint8_t* __restrict__ packed, int64_t n, int64_t k, int bits,
                              int64_t row_bytes, uint8_t* __restrict__ codes) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * k) return;
  const int64_t row = idx / k, col = idx - row * k;
  const int64_t bit = col * bits;
  const uint8_t* src = packed + row * row_bytes + bit / 8;
  uint32_t word = src[0];
  if ((bit % 8) + bits > 8) word |= static_cast<uint32_t>(src[1]) << 8;
  codes[idx] = static_cast<uint8_t>((word >> (bit % 8)) & ((1u << bits) - 1u));
}

template <Elementwise kOp>
cudaError_t launch_elementwise(const float* w, const uint8_t* codes, const uint16_t* scale,
                               const uint8_t* zero, int64_t n, int64_t k, int bits, int64_t g,
                               uint8_t* codes_out, float* out, cudaStream_t stream) {
  if (n * k == 0) return cudaSuccess;
  elementwise_kernel<kOp><<<blocks_for(n * k), kThreads, 0, stream>>>(
      w, codes, scale, zero, n, k, g, num_groups(k, g), static_cast<float>(max_code(bits)), codes_out, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t quant_params(const float* w, int64_t n, int64_t k, int bits, int64_t g, int search_steps,
                         uint16_t* scale, uint8_t* zero, cudaStream_t stream) {
  const int64_t groups = num_groups(k, g);
  if (n * groups == 0) return cudaSuccess;
  quant_params_kernel<<<blocks_for(n * groups), kThreads, 0, stream>>>(
      w, n, k, g, groups, static_cast<float>(max_code(bits)), search_steps, scale, zero);
  return cudaGetLastError();
}

cudaError_t quantize(const float* w, const uint16_t* scale, const uint8_t* zero, int64_t n, int64_t k,
                     int bits, int64_t g, uint8_t* codes, cudaStream_t stream) {
  return launch_elementwise<Elementwise::kQuantize>(w, nullptr, scale, zero, n, k, bits, g, codes, nullptr,
                                                    stream);
}

cudaError_t dequantize(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, int64_t n,
                       int64_t k, int64_t g, float* out, cudaStream_t stream) {
  return launch_elementwise<Elementwise::kDequantize>(nullptr, codes, scale, zero, n, k, kMaxBits, g, nullptr,
                                                      out, stream);
}

cudaError_t fake_quantize(const float* w, const uint16_t* scale, const uint8_t* zero, int64_t n, int64_t k,
                          int bits, int64_t g, float* out, cudaStream_t stream) {
  return launch_elementwise<Elementwise::kFakeQuantize>(w, nullptr, scale, zero, n, k, bits, g, nullptr, out,
                                                        stream);
}

cudaError_t pack(const uint8_t* codes, int64_t n, int64_t k, int bits, int64_t g, uint8_t* packed,
                 cudaStream_t stream) {
  const int64_t row_bytes = packed_row_bytes(k, g, bits);
  if (n * row_bytes == 0) return cudaSuccess;
  pack_kernel<<<blocks_for(n * row_bytes), kThreads, 0, stream>>>(codes, n, k, bits, row_bytes, packed);
  return cudaGetLastError();
}

cudaError_t unpack(const uint8_t* packed, int64_t n, int64_t k, int bits, int64_t g, uint8_t* codes,
                   cudaStream_t stream) {
  if (n * k == 0) return cudaSuccess;
  unpack_kernel<<<blocks_for(n * k), kThreads, 0, stream>>>(packed, n, k, bits,
                                                             packed_row_bytes(k, g, bits), codes);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace brecq
