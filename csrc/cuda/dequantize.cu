// CUDA dequantization of packed weights (format.h) into a dense workspace: the first step of the
// GPU GEMM path (dequantize a tile, then a tensor-core matmul in torch). The bandwidth-bound GEMV
// and fused AdaRound kernels are separate work (issue: CUDA kernels).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "brecq/format.h"
#include "cuda_kernels.h"

namespace brecq {
namespace cuda {
namespace {

template <typename Out>
__device__ inline Out convert(float v);
template <>
__device__ inline float convert<float>(float v) { return v; }
template <>
__device__ inline __nv_bfloat16 convert<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ inline __half convert<__half>(float v) { return __float2half_rn(v); }

// One thread per weight; consecutive threads read consecutive codes of a row (coalesced).
template <typename Out>
__global__ void dequantize_packed_kernel(const uint8_t* __restrict__ packed,
                                         const uint16_t* __restrict__ scale,
                                         const uint8_t* __restrict__ zero, int64_t n, int64_t k,
                                         int bits, int64_t g, int64_t groups, int64_t row_bytes,
                                         Out* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * k) return;
  const int64_t row = idx / k, col = idx - row * k;
  const int64_t bit = col * bits;
  const uint8_t* src = packed + row * row_bytes + bit / 8;
  uint32_t word = src[0];
  if ((bit % 8) + bits > 8) word |= static_cast<uint32_t>(src[1]) << 8;
  const uint32_t code = (word >> (bit % 8)) & ((1u << bits) - 1u);
  const int64_t grp = row * groups + col / g;
  const float s = __half2float(__ushort_as_half(scale[grp]));
  out[idx] = convert<Out>((static_cast<float>(code) - static_cast<float>(zero[grp])) * s);
}

}  // namespace

cudaError_t dequantize_packed(const uint8_t* packed, const uint16_t* scale, const uint8_t* zero,
                              int64_t n, int64_t k, int bits, int64_t g, void* out,
                              OutputType out_type, cudaStream_t stream) {
  const int64_t total = n * k;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned blocks = static_cast<unsigned>((total + kThreads - 1) / kThreads);
  const int64_t groups = num_groups(k, g);
  const int64_t row_bytes = packed_row_bytes(k, g, bits);
  switch (out_type) {
    case OutputType::kFloat32:
      dequantize_packed_kernel<float><<<blocks, kThreads, 0, stream>>>(
          packed, scale, zero, n, k, bits, g, groups, row_bytes, static_cast<float*>(out));
      break;
    case OutputType::kBFloat16:
      dequantize_packed_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(
          packed, scale, zero, n, k, bits, g, groups, row_bytes, static_cast<__nv_bfloat16*>(out));
      break;
    case OutputType::kFloat16:
      dequantize_packed_kernel<__half><<<blocks, kThreads, 0, stream>>>(
          packed, scale, zero, n, k, bits, g, groups, row_bytes, static_cast<__half*>(out));
      break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace brecq
