// CUDA dequantization of packed weights (format.h) into a dense workspace: the first step of the
// GPU GEMM path (dequantize a tile, then a tensor-core matmul in torch). Decode-sized inputs use
// the GEMV kernels instead (gemv.cu, gemv_mma.cu).
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

// One thread per 8 consecutive codes of a row (`bits` whole bytes, since groups are multiples of
// 8): one wide load of codes and, when rows are 16-byte aligned, one 16-byte store of 8 bfloat16 /
// float16 values (two for float32). The GEMM path is bound by this write.
template <typename Out>
__global__ void dequantize_packed_x8_kernel(const uint8_t* __restrict__ packed,
                                            const uint16_t* __restrict__ scale,
                                            const uint8_t* __restrict__ zero, int64_t n, int64_t k,
                                            int bits, int64_t g, int64_t groups, int64_t row_bytes,
                                            int64_t chunks_per_row, bool aligned, bool vector_store,
                                            Out* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * chunks_per_row) return;
  const int64_t row = idx / chunks_per_row, col = (idx - row * chunks_per_row) * 8;
  const uint8_t* src = packed + row * row_bytes + col * bits / 8;
  // Whole-word loads where the chunk's alignment allows (rows and chunks start on multiples of
  // `bits` bytes from an 8-byte aligned base): 4 and 8 bits one load, 2 and 6 bits 16-bit loads.
  uint64_t word = 0;
  if (!aligned) {  // a packed tensor that is a view at an odd offset
    for (int b = 0; b < bits; ++b) word |= static_cast<uint64_t>(src[b]) << (8 * b);
  } else if (bits == 4) {
    word = *reinterpret_cast<const uint32_t*>(src);
  } else if (bits == 8) {
    word = *reinterpret_cast<const uint64_t*>(src);
  } else if (bits == 2 || bits == 6) {
    const uint16_t* half_words = reinterpret_cast<const uint16_t*>(src);
    for (int b = 0; b < bits / 2; ++b) word |= static_cast<uint64_t>(half_words[b]) << (16 * b);
  } else {
    for (int b = 0; b < bits; ++b) word |= static_cast<uint64_t>(src[b]) << (8 * b);
  }
  const int64_t grp = row * groups + col / g;  // 8 codes never straddle a group (g % 8 == 0)
  const float s = __half2float(__ushort_as_half(scale[grp]));
  const float z = static_cast<float>(zero[grp]);
  const uint64_t mask = (1ull << bits) - 1ull;
  alignas(16) Out values[8];
#pragma unroll
  for (int j = 0; j < 8; ++j)
    values[j] = convert<Out>((static_cast<float>((word >> (bits * j)) & mask) - z) * s);
  Out* dst = out + row * k + col;
  if (vector_store && col + 8 <= k) {
    constexpr int kVectors = sizeof(Out) * 8 / 16;
#pragma unroll
    for (int v = 0; v < kVectors; ++v)
      reinterpret_cast<uint4*>(dst)[v] = reinterpret_cast<const uint4*>(values)[v];
  } else {
    for (int j = 0; j < 8 && col + j < k; ++j) dst[j] = values[j];
  }
}

template <typename Out>
cudaError_t launch_x8(const uint8_t* packed, const uint16_t* scale, const uint8_t* zero, int64_t n, int64_t k,
                      int bits, int64_t g, void* out, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t chunks_per_row = (k + 7) / 8;
  const int64_t total = n * chunks_per_row;
  const bool aligned = reinterpret_cast<uintptr_t>(packed) % 8 == 0;
  const bool vector_store = k % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  dequantize_packed_x8_kernel<Out><<<static_cast<unsigned>((total + kThreads - 1) / kThreads), kThreads, 0,
                                     stream>>>(packed, scale, zero, n, k, bits, g, num_groups(k, g),
                                               packed_row_bytes(k, g, bits), chunks_per_row, aligned, vector_store,
                                               static_cast<Out*>(out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t dequantize_packed(const uint8_t* packed, const uint16_t* scale, const uint8_t* zero,
                              int64_t n, int64_t k, int bits, int64_t g, void* out,
                              OutputType out_type, cudaStream_t stream) {
  if (n * k == 0) return cudaSuccess;
  if (g % 8 != 0) return cudaErrorInvalidValue;  // the format's group sizes are multiples of 8
  switch (out_type) {
    case OutputType::kFloat32: return launch_x8<float>(packed, scale, zero, n, k, bits, g, out, stream);
    case OutputType::kBFloat16: return launch_x8<__nv_bfloat16>(packed, scale, zero, n, k, bits, g, out, stream);
    case OutputType::kFloat16: return launch_x8<__half>(packed, scale, zero, n, k, bits, g, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace brecq
