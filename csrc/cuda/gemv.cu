// Packed W4/W6 GEMV on CUDA for decode-sized inputs (1..16 activation rows): bandwidth-bound.
// One warp per output row; each lane streams 16 bytes (W4: 32 codes) or 12 bytes (W6: 16 codes)
// of the row per step with vector loads, dequantizes in registers and accumulates in float32
// against activations staged in shared memory as float32. Layout: docs/FORMAT.md.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "brecq/format.h"
#include "cuda_kernels.h"

namespace brecq {
namespace cuda {
namespace {

constexpr int kWarps = 8;  // output rows per block
constexpr int kMaxRows = 16;

__host__ __device__ inline int64_t padded_stride(int64_t k_padded) { return k_padded + k_padded / 32; }

template <typename T>
__device__ inline float to_float(T v);
template <> __device__ inline float to_float<float>(float v) { return v; }
template <> __device__ inline float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ inline float to_float<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ inline T from_float(float v);
template <> __device__ inline float from_float<float>(float v) { return v; }
template <> __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ inline __half from_float<__half>(float v) { return __float2half_rn(v); }

// Codes per lane step and bytes they take.
template <int Bits> struct Step;
template <> struct Step<4> { static constexpr int kCodes = 32; static constexpr int kBytes = 16; };
template <> struct Step<6> { static constexpr int kCodes = 16; static constexpr int kBytes = 12; };

template <int Bits>
__device__ inline void load_codes(const uint8_t* p, float (&q)[Step<Bits>::kCodes]);

template <>
__device__ inline void load_codes<4>(const uint8_t* p, float (&q)[32]) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int w = 0; w < 4; ++w)
#pragma unroll
    for (int j = 0; j < 8; ++j) q[8 * w + j] = static_cast<float>((words[w] >> (4 * j)) & 0xfu);
}

template <>
__device__ inline void load_codes<6>(const uint8_t* p, float (&q)[16]) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(p);  // 12-byte runs start 4-byte aligned
  const uint64_t lo = static_cast<uint64_t>(w[0]) | (static_cast<uint64_t>(w[1]) << 32);
  const uint32_t hi = w[2];
#pragma unroll
  for (int j = 0; j < 10; ++j) q[j] = static_cast<float>((lo >> (6 * j)) & 0x3fu);
  // code 10 straddles the 64-bit boundary: bits 60..65
  q[10] = static_cast<float>(((lo >> 60) | (static_cast<uint64_t>(hi) << 4)) & 0x3fu);
#pragma unroll
  for (int j = 11; j < 16; ++j) q[j] = static_cast<float>((hi >> (6 * j - 64)) & 0x3fu);
}

template <int Bits, typename TX, typename TY>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(
    const TX* __restrict__ x, int m, int64_t x_stride, const uint8_t* __restrict__ packed,
    const uint16_t* __restrict__ scale, const uint8_t* __restrict__ zero, const float* __restrict__ bias,
    int64_t n, int64_t k, int64_t k_padded, int64_t g, int64_t groups, int64_t row_bytes, TY* __restrict__ y) {
  // Activations as float32, zero beyond k, one padding float after every 32 so that the lanes of a
  // warp (each reading its own run of consecutive codes) hit 32 different banks.
  extern __shared__ float xs[];
  const int64_t x_row = padded_stride(k_padded);
  for (int64_t i = threadIdx.x; i < static_cast<int64_t>(m) * k_padded; i += blockDim.x) {
    const int64_t r = i / k_padded, c = i - r * k_padded;
    xs[r * x_row + c + c / 32] = c < k ? to_float(x[r * x_stride + c]) : 0.0f;
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= n) return;
  constexpr int C = Step<Bits>::kCodes, B = Step<Bits>::kBytes;
  const uint8_t* w = packed + row * row_bytes;
  float acc[kMaxRows];
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) acc[r] = 0.0f;
  for (int64_t c0 = static_cast<int64_t>(lane) * C; c0 < k_padded; c0 += 32 * C) {
    float q[C];
    load_codes<Bits>(w + c0 / C * B, q);
    // A lane's codes never straddle a group: group sizes are multiples of 32 (checked by the host).
    const int64_t grp = c0 / g;
    const float s = __half2float(__ushort_as_half(scale[row * groups + grp]));
    const float z = static_cast<float>(zero[row * groups + grp]);
#pragma unroll
    for (int j = 0; j < C; ++j) q[j] = (q[j] - z) * s;
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r >= m) break;
      // A lane's C codes lie inside one 32-code run (C divides 32), so no padding float between them.
      const float* xr = xs + r * x_row + c0 + c0 / 32;
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < C; ++j) sum = fmaf(q[j], xr[j], sum);
      acc[r] += sum;
    }
  }
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    if (r >= m) break;
    float v = acc[r];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) y[r * n + row] = from_float<TY>(v + (bias ? bias[row] : 0.0f));
  }
}

template <int Bits, typename T>
cudaError_t launch(const void* x, int m, int64_t x_stride, const uint8_t* packed, const uint16_t* scale,
                   const uint8_t* zero, const float* bias, int64_t n, int64_t k, int64_t g, void* y,
                   cudaStream_t stream) {
  const int64_t k_padded = padded_in_features(k, g), groups = num_groups(k, g);
  const size_t smem = static_cast<size_t>(m) * padded_stride(k_padded) * sizeof(float);
  if (smem > 48 * 1024) {
    cudaError_t status = cudaFuncSetAttribute(gemv_kernel<Bits, T, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(smem));
    if (status != cudaSuccess) return status;
  }
  const unsigned blocks = static_cast<unsigned>((n + kWarps - 1) / kWarps);
  gemv_kernel<Bits, T, T><<<blocks, kWarps * 32, smem, stream>>>(
      static_cast<const T*>(x), m, x_stride, packed, scale, zero, bias, n, k, k_padded, g, groups,
      packed_row_bytes(k, g, Bits), static_cast<T*>(y));
  return cudaGetLastError();
}

template <int Bits>
cudaError_t dispatch_dtype(const void* x, OutputType dtype, int m, int64_t x_stride, const uint8_t* packed,
                           const uint16_t* scale, const uint8_t* zero, const float* bias, int64_t n, int64_t k,
                           int64_t g, void* y, cudaStream_t stream) {
  switch (dtype) {
    case OutputType::kFloat32: return launch<Bits, float>(x, m, x_stride, packed, scale, zero, bias, n, k, g, y, stream);
    case OutputType::kBFloat16: return launch<Bits, __nv_bfloat16>(x, m, x_stride, packed, scale, zero, bias, n, k, g, y, stream);
    default: return launch<Bits, __half>(x, m, x_stride, packed, scale, zero, bias, n, k, g, y, stream);
  }
}

}  // namespace

bool packed_gemv_supported(int bits, int64_t g, int m, int64_t k) {
  return (bits == 4 || bits == 6) && g % 32 == 0 && m >= 1 && m <= kMaxRows &&
         static_cast<int64_t>(m) * padded_stride(padded_in_features(k, g)) * 4 <= 160 * 1024;
}

cudaError_t packed_gemv(const void* x, OutputType dtype, int m, int64_t x_stride, const uint8_t* packed,
                        const uint16_t* scale, const uint8_t* zero, const float* bias, int64_t n, int64_t k,
                        int bits, int64_t g, void* y, cudaStream_t stream) {
  if (!packed_gemv_supported(bits, g, m, k)) return cudaErrorInvalidValue;
  return bits == 4 ? dispatch_dtype<4>(x, dtype, m, x_stride, packed, scale, zero, bias, n, k, g, y, stream)
                   : dispatch_dtype<6>(x, dtype, m, x_stride, packed, scale, zero, bias, n, k, g, y, stream);
}

}  // namespace cuda
}  // namespace brecq
