// Packed W4/W6 GEMV on CUDA for decode-sized inputs (1..16 activation rows): bandwidth-bound.
// One warp per output row; each lane streams 16 bytes (W4: 32 codes) or 12 bytes (W6: 16 codes)
// of the row per step with vector loads, dequantizes in registers and accumulates in float32
// against activations staged in shared memory as float32. Layout: docs/FORMAT.md.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
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

// One lane step of packed codes, loaded with vector loads and decoded later, so that the next
// step's load can be in flight while this one is being multiplied.
template <int Bits> struct Chunk;
template <> struct Chunk<4> { uint4 v; };
template <> struct Chunk<6> { uint32_t w0, w1, w2; };

template <int Bits>
__device__ inline Chunk<Bits> load_chunk(const uint8_t* p);
template <>
__device__ inline Chunk<4> load_chunk<4>(const uint8_t* p) { return {__ldg(reinterpret_cast<const uint4*>(p))}; }
template <>
__device__ inline Chunk<6> load_chunk<6>(const uint8_t* p) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(p);  // 12-byte runs start 4-byte aligned
  return {__ldg(w), __ldg(w + 1), __ldg(w + 2)};
}

template <int Bits>
__device__ inline void decode(const Chunk<Bits>& chunk, float (&q)[Step<Bits>::kCodes]);

template <>
__device__ inline void decode<4>(const Chunk<4>& chunk, float (&q)[32]) {
  const uint32_t words[4] = {chunk.v.x, chunk.v.y, chunk.v.z, chunk.v.w};
#pragma unroll
  for (int w = 0; w < 4; ++w)
#pragma unroll
    for (int j = 0; j < 8; ++j) q[8 * w + j] = static_cast<float>((words[w] >> (4 * j)) & 0xfu);
}

template <>
__device__ inline void decode<6>(const Chunk<6>& chunk, float (&q)[16]) {
  const uint64_t lo = static_cast<uint64_t>(chunk.w0) | (static_cast<uint64_t>(chunk.w1) << 32);
  const uint32_t hi = chunk.w2;
#pragma unroll
  for (int j = 0; j < 10; ++j) q[j] = static_cast<float>((lo >> (6 * j)) & 0x3fu);
  // code 10 straddles the 64-bit boundary: bits 60..65
  q[10] = static_cast<float>(((lo >> 60) | (static_cast<uint64_t>(hi) << 4)) & 0x3fu);
#pragma unroll
  for (int j = 11; j < 16; ++j) q[j] = static_cast<float>((hi >> (6 * j - 64)) & 0x3fu);
}

// A lane's step: its packed codes and the scale/zero of the group they lie in.
template <int Bits>
struct LaneStep {
  Chunk<Bits> codes;
  uint16_t scale_bits;
  uint8_t zero;
};

template <int Bits>
__device__ inline LaneStep<Bits> load_step(const uint8_t* row_codes, const uint16_t* row_scale,
                                           const uint8_t* row_zero, int64_t c0, int64_t g) {
  constexpr int C = Step<Bits>::kCodes, B = Step<Bits>::kBytes;
  // A lane's codes never straddle a group: group sizes are multiples of 32 (checked by the host).
  const int64_t grp = c0 / g;
  return {load_chunk<Bits>(row_codes + c0 / C * B), __ldg(row_scale + grp), __ldg(row_zero + grp)};
}

template <int Bits, typename TX, typename TY>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(
    const TX* __restrict__ x, int m, int64_t x_stride, const uint8_t* __restrict__ packed,
    const uint16_t* __restrict__ scale, const uint8_t* __restrict__ zero, const float* __restrict__ bias,
    int64_t n, int64_t k, int64_t k_padded, int64_t g, int64_t groups, int64_t row_bytes, TY* __restrict__ y) {
  constexpr int C = Step<Bits>::kCodes;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const bool active = row < n;
  const uint8_t* row_codes = packed + row * row_bytes;
  const uint16_t* row_scale = scale + row * groups;
  const uint8_t* row_zero = zero + row * groups;
  // The first weight load is issued before the activations are staged, so that the two memory
  // latencies overlap instead of adding up (at decode sizes the kernel is latency-bound).
  int64_t c0 = static_cast<int64_t>(lane) * C;
  bool have = active && c0 < k_padded;
  LaneStep<Bits> cur{};
  if (have) cur = load_step<Bits>(row_codes, row_scale, row_zero, c0, g);

  // Activations as float32, zero beyond k, one padding float after every 32 so that the lanes of a
  // warp (each reading its own run of consecutive codes) hit 32 different banks.
  extern __shared__ float xs[];
  const int64_t x_row = padded_stride(k_padded);
  for (int64_t i = threadIdx.x; i < static_cast<int64_t>(m) * k_padded; i += blockDim.x) {
    const int64_t r = i / k_padded, c = i - r * k_padded;
    xs[r * x_row + c + c / 32] = c < k ? to_float(x[r * x_stride + c]) : 0.0f;
  }
  __syncthreads();
  if (!active) return;

  float acc[kMaxRows];
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) acc[r] = 0.0f;
  while (have) {
    const int64_t c_next = c0 + 32 * C;
    const bool have_next = c_next < k_padded;
    LaneStep<Bits> next{};
    if (have_next) next = load_step<Bits>(row_codes, row_scale, row_zero, c_next, g);
    float q[C];
    decode<Bits>(cur.codes, q);
    const float s = __half2float(__ushort_as_half(cur.scale_bits));
    const float z = static_cast<float>(cur.zero);
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
    cur = next;
    c0 = c_next;
    have = have_next;
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

// Shared memory one block may use on the current device (opt-in limit: 227 KiB on sm_90,
// 163 KiB on sm_80), cached per device.
size_t max_shared_bytes() {
  static std::atomic<int> cache[64];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 48 * 1024;
  if (device >= 0 && device < 64) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return static_cast<size_t>(known);
  }
  int bytes = 0;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      bytes <= 0) {
    cudaGetLastError();  // clear the error so that a later launch does not report it
    return 48 * 1024;
  }
  if (device >= 0 && device < 64) cache[device].store(bytes, std::memory_order_relaxed);
  return static_cast<size_t>(bytes);
}

}  // namespace

int multiprocessor_count() {
  static std::atomic<int> cache[64];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) {
    cudaGetLastError();
    return 132;
  }
  int sms = cache[device].load(std::memory_order_relaxed);
  if (sms <= 0) {
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
      cudaGetLastError();
      return 132;
    }
    cache[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

namespace {

size_t shared_bytes(int m, int64_t k, int64_t g) {
  return static_cast<size_t>(m) * padded_stride(padded_in_features(k, g)) * sizeof(float);
}

template <int Bits, typename T>
cudaError_t launch(const void* x, int m, int64_t x_stride, const uint8_t* packed, const uint16_t* scale,
                   const uint8_t* zero, const float* bias, int64_t n, int64_t k, int64_t g, void* y,
                   cudaStream_t stream) {
  const int64_t k_padded = padded_in_features(k, g), groups = num_groups(k, g);
  const size_t smem = shared_bytes(m, k, g);
  if (smem > 48 * 1024) {
    // Raise the kernel's shared-memory limit once per device and size, not on every launch: the
    // call is not a stream operation, and launches may be captured into a CUDA graph.
    static std::atomic<size_t> configured[64];
    int device = 0;
    cudaError_t status = cudaGetDevice(&device);
    if (status != cudaSuccess) return status;
    std::atomic<size_t>* slot = device >= 0 && device < 64 ? &configured[device] : nullptr;
    if (slot == nullptr || slot->load(std::memory_order_relaxed) < smem) {
      status = cudaFuncSetAttribute(gemv_kernel<Bits, T, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem));
      if (status != cudaSuccess) return status;
      if (slot != nullptr) slot->store(smem, std::memory_order_relaxed);
    }
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

namespace {
bool simt_supported(const uint8_t* packed, int bits, int64_t g, int m, int64_t k) {
  return reinterpret_cast<uintptr_t>(packed) % 16 == 0 && (bits == 4 || bits == 6) && g % 32 == 0 && m >= 1 && m <= kMaxRows &&
         shared_bytes(m, k, g) <= max_shared_bytes();
}
}  // namespace

bool packed_gemv_supported(const void* x, const uint8_t* packed, OutputType dtype, int bits, int64_t g, int m,
                           int64_t k, int64_t x_stride, GemvKernel kernel) {
  const bool tensor_cores = packed_gemv_mma_supported(x, packed, dtype, bits, g, m, x_stride);
  switch (kernel) {
    case GemvKernel::kSimt: return simt_supported(packed, bits, g, m, k);
    case GemvKernel::kMma8: return tensor_cores;
    case GemvKernel::kMma16: return packed_gemv_mma16_supported(x, packed, dtype, bits, g, m, 1, k, x_stride);
    default: return tensor_cores || simt_supported(packed, bits, g, m, k);
  }
}

cudaError_t packed_gemv(const void* x, OutputType dtype, int m, int64_t x_stride, const uint8_t* packed,
                        const uint16_t* scale, const uint8_t* zero, const float* bias, int64_t n, int64_t k,
                        int bits, int64_t g, void* y, cudaStream_t stream, GemvKernel kernel) {
  // Each launcher checks its own limits, so the choice is made once here and not checked again.
  int tuning = 0;
  if (kernel == GemvKernel::kAuto) {
    if (packed_gemv_mma_supported(x, packed, dtype, bits, g, m, x_stride)) {
      const GemvChoice choice = choose_tensor_core_gemv(
          n, k, g, bits, m, multiprocessor_count(), packed_gemv_mma16_supported(x, packed, dtype, bits, g, m, n, k, x_stride));
      kernel = choice.kernel;
      tuning = choice.tuning;
    } else {
      kernel = GemvKernel::kSimt;
    }
  }
  if (kernel == GemvKernel::kMma16)
    return packed_gemv_mma16(x, dtype, m, x_stride, packed, scale, zero, bias, n, k, bits, g, y, stream, tuning);
  if (kernel == GemvKernel::kMma8)
    return packed_gemv_mma(x, dtype, m, x_stride, packed, scale, zero, bias, n, k, bits, g, y, stream);
  if (!simt_supported(packed, bits, g, m, k)) return cudaErrorInvalidValue;
  return bits == 4 ? dispatch_dtype<4>(x, dtype, m, x_stride, packed, scale, zero, bias, n, k, g, y, stream)
                   : dispatch_dtype<6>(x, dtype, m, x_stride, packed, scale, zero, bias, n, k, g, y, stream);
}

}  // namespace cuda
}  // namespace brecq
