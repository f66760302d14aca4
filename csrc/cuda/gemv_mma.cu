// Packed W4/W6 matmul for 1..16 rows of bfloat16/float16 activations on tensor cores
// (mma.sync m16n8k16, sm_80+): the decode path of a quantized model on the GPU.
//
// A warp computes a tile of 8 output features (the n = 8 of one MMA). When a layer has too few
// tiles to fill the GPU (the 1024-feature layers of Qwen3-0.6B have 128), `split` warps of a block
// share a tile and split K between them, adding their partial sums in shared memory at the end;
// a layer with many tiles (the 151936-feature lm_head) gives each warp its own tile and all of K.
// Per 64-code block a lane loads 16 codes of one weight row (8 bytes at 4 bits, 12 at 6), the zero
// point of that row and the scales of the two rows whose outputs it accumulates, and 16
// activations of rows g and g + 8 (zero beyond m).
// Up to kUnroll such blocks are loaded before any is multiplied, to keep loads in flight.
//
// The B operand holds the integers (code - zero), exact in bfloat16/float16; the MMA sums their
// products with the activations exactly into float32, and the group's scale is applied after the
// MMA, per output feature. So the only roundings are float32 accumulation and the final output
// conversion, as in the SIMT kernel.
//
// K order inside a block: an MMA step s (0..3) takes from lane (g, t) the codes
// 16t + 4s + {0, 1} as B rows 2t, 2t+1 and 16t + 4s + {2, 3} as B rows 2t+8, 2t+9. A dot product
// does not depend on the order of its terms, so the A operand (activations) only has to use the
// same order, which it does by loading the same 16 consecutive positions.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "brecq/format.h"
#include "cuda_kernels.h"
#include "mma_operands.cuh"

namespace brecq {
namespace cuda {
namespace {

constexpr int kMmaWarps = 8;   // warps per block
constexpr int kTileRows = 8;   // output features per tile (one warp's, or shared by `split` warps)
constexpr int kBlockK = 64;    // codes per K block (four MMA steps of 16)
constexpr int kLaneCodes = mma::kRunCodes;  // codes one lane feeds per K block
constexpr int kUnroll = 4;     // K blocks a warp loads before it multiplies

using mma::CodeRun;
using mma::load_activations;
using mma::load_code_run;
using mma::Mma;

template <int Bits>
__device__ inline void decode16(const CodeRun<Bits>& c, float (&q)[kLaneCodes]);
template <>
__device__ inline void decode16<4>(const CodeRun<4>& c, float (&q)[kLaneCodes]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    q[j] = static_cast<float>((c.w[0] >> (4 * j)) & 0xfu);
    q[8 + j] = static_cast<float>((c.w[1] >> (4 * j)) & 0xfu);
  }
}
template <>
__device__ inline void decode16<6>(const CodeRun<6>& c, float (&q)[kLaneCodes]) {
  const uint64_t lo = static_cast<uint64_t>(c.w[0]) | (static_cast<uint64_t>(c.w[1]) << 32);
#pragma unroll
  for (int j = 0; j < 10; ++j) q[j] = static_cast<float>((lo >> (6 * j)) & 0x3fu);
  q[10] = static_cast<float>(((lo >> 60) | (static_cast<uint64_t>(c.w[2]) << 4)) & 0x3fu);  // bits 60..65
#pragma unroll
  for (int j = 11; j < 16; ++j) q[j] = static_cast<float>((c.w[2] >> (6 * j - 64)) & 0x3fu);
}

template <int Bits, typename T, bool kHighRows>
__global__ void __launch_bounds__(kMmaWarps * 32, kHighRows ? 2 : 3) gemv_mma_kernel(
    const uint16_t* __restrict__ x, int m, int64_t x_stride, const uint8_t* __restrict__ packed,
    const uint16_t* __restrict__ scale, const uint8_t* __restrict__ zero, const float* __restrict__ bias,
    int64_t n, int64_t k, int64_t g, int64_t groups, int64_t row_bytes, int64_t k_blocks, int split,
    T* __restrict__ y) {
  constexpr int kBlockBytes = kBlockK * Bits / 8, kLaneBytes = kLaneCodes * Bits / 8;
  __shared__ float partial[kMmaWarps][32][4];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gid = lane / 4, tig = lane % 4;
  const int tiles_per_block = kMmaWarps / split;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * tiles_per_block + warp / split) * kTileRows;
  const int64_t b_row = row0 + gid;      // the weight row whose codes this lane feeds to B
  const bool b_valid = b_row < n;
  const int64_t c_row = row0 + 2 * tig;  // the weight rows of this lane's accumulators: c_row, c_row + 1
  const uint8_t* codes_row = packed + (b_valid ? b_row : 0) * row_bytes + tig * kLaneBytes;
  const uint16_t* x_low = x + static_cast<int64_t>(gid) * x_stride;  // A rows gid and gid + 8
  const bool low_valid = gid < m;
  const bool high_valid = kHighRows && gid + 8 < m;

  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t kb0 = warp % split; kb0 < k_blocks; kb0 += static_cast<int64_t>(split) * kUnroll) {
    CodeRun<Bits> codes[kUnroll];
    uint8_t zp[kUnroll];
    uint16_t s0[kUnroll], s1[kUnroll];
    uint32_t xa[kUnroll][8], xb[kUnroll][8];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t kb = kb0 + static_cast<int64_t>(u) * split;
      const bool live = kb < k_blocks;
      const int64_t grp = kb * kBlockK / g;  // g is a multiple of 64: a K block lies in one group
      codes[u] = live && b_valid ? load_code_run<Bits>(codes_row + kb * kBlockBytes) : CodeRun<Bits>{};
      zp[u] = live && b_valid ? __ldg(zero + b_row * groups + grp) : 0;
      s0[u] = live && c_row < n ? __ldg(scale + c_row * groups + grp) : 0;
      s1[u] = live && c_row + 1 < n ? __ldg(scale + (c_row + 1) * groups + grp) : 0;
      const int64_t col = kb * kBlockK + tig * kLaneCodes;
      load_activations(xa[u], live && low_valid, x_low, col, k);
      if (kHighRows) load_activations(xb[u], live && high_valid, x_low + 8 * x_stride, col, k);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (kb0 + static_cast<int64_t>(u) * split >= k_blocks) break;
      float q[kLaneCodes];
      decode16<Bits>(codes[u], q);
      const float z = static_cast<float>(zp[u]);
      float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const uint32_t b0 = Mma<T>::pack(q[4 * s] - z, q[4 * s + 1] - z);
        const uint32_t b1 = Mma<T>::pack(q[4 * s + 2] - z, q[4 * s + 3] - z);
        Mma<T>::run(c, xa[u][2 * s], kHighRows ? xb[u][2 * s] : 0u, xa[u][2 * s + 1],
                    kHighRows ? xb[u][2 * s + 1] : 0u, b0, b1);
      }
      const float sc0 = __half2float(__ushort_as_half(s0[u])), sc1 = __half2float(__ushort_as_half(s1[u]));
      acc[0] += c[0] * sc0;  // (A row gid,     output feature c_row)
      acc[1] += c[1] * sc1;  // (A row gid,     output feature c_row + 1)
      acc[2] += c[2] * sc0;  // (A row gid + 8, output feature c_row)
      acc[3] += c[3] * sc1;  // (A row gid + 8, output feature c_row + 1)
    }
  }
  if (split > 1) {  // uniform across the block: every warp reaches the barrier
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][lane][i] = acc[i];
    __syncthreads();
    if (warp % split != 0) return;
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] = 0.0f;
    for (int w = warp; w < warp + split; ++w)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i] += partial[w][lane][i];
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = gid + (i >= 2 ? 8 : 0);
    const int64_t feature = c_row + (i & 1);
    if (row < m && feature < n)
      y[static_cast<int64_t>(row) * n + feature] = Mma<T>::from_float(acc[i] + (bias ? bias[feature] : 0.0f));
  }
}

// Warps sharing one tile: enough warps in all to fill every SM (about 24 resident warps each at
// this kernel's register use), without splitting K when the layer has tiles enough.
int split_for(int64_t tiles, int sms) {
  const int64_t target = static_cast<int64_t>(sms) * 24;
  int split = 1;
  while (split < kMmaWarps && tiles * split < target) split *= 2;
  return split;
}

template <int Bits, typename T>
cudaError_t launch_mma(const void* x, int m, int64_t x_stride, const uint8_t* packed, const uint16_t* scale,
                       const uint8_t* zero, const float* bias, int64_t n, int64_t k, int64_t g, void* y,
                       cudaStream_t stream) {
  const int64_t k_blocks = padded_in_features(k, g) / kBlockK;
  const int64_t tiles = (n + kTileRows - 1) / kTileRows;
  const int split = split_for(tiles, multiprocessor_count());
  const int64_t tiles_per_block = kMmaWarps / split;
  const unsigned blocks = static_cast<unsigned>((tiles + tiles_per_block - 1) / tiles_per_block);
  const auto* xs = static_cast<const uint16_t*>(x);
  const int64_t groups = num_groups(k, g), row_bytes = packed_row_bytes(k, g, Bits);
  if (m > 8)
    gemv_mma_kernel<Bits, T, true><<<blocks, kMmaWarps * 32, 0, stream>>>(
        xs, m, x_stride, packed, scale, zero, bias, n, k, g, groups, row_bytes, k_blocks, split, static_cast<T*>(y));
  else
    gemv_mma_kernel<Bits, T, false><<<blocks, kMmaWarps * 32, 0, stream>>>(
        xs, m, x_stride, packed, scale, zero, bias, n, k, g, groups, row_bytes, k_blocks, split, static_cast<T*>(y));
  return cudaGetLastError();
}

}  // namespace

int packed_gemv_mma_rounds(int64_t n, int64_t k, int64_t g, int sms) {
  const int64_t k_blocks = padded_in_features(k, g) / kBlockK;
  const int64_t split = split_for((n + kTileRows - 1) / kTileRows, sms);
  const int64_t per_warp = (k_blocks + split - 1) / split;  // warps sharing a tile take K blocks in turn
  return static_cast<int>((per_warp + kUnroll - 1) / kUnroll);
}

bool packed_gemv_mma_supported(const void* x, const uint8_t* packed, OutputType dtype, int bits, int64_t g, int m,
                               int64_t x_stride) {
  return reinterpret_cast<uintptr_t>(packed) % 8 == 0 && dtype != OutputType::kFloat32 && (bits == 4 || bits == 6) && g % kBlockK == 0 && m >= 1 && m <= 16 &&
         reinterpret_cast<uintptr_t>(x) % 16 == 0 && (m == 1 || x_stride % 8 == 0);
}

cudaError_t packed_gemv_mma(const void* x, OutputType dtype, int m, int64_t x_stride, const uint8_t* packed,
                            const uint16_t* scale, const uint8_t* zero, const float* bias, int64_t n, int64_t k,
                            int bits, int64_t g, void* y, cudaStream_t stream) {
  if (!packed_gemv_mma_supported(x, packed, dtype, bits, g, m, x_stride)) return cudaErrorInvalidValue;
  if (dtype == OutputType::kBFloat16)
    return bits == 4 ? launch_mma<4, __nv_bfloat16>(x, m, x_stride, packed, scale, zero, bias, n, k, g, y, stream)
                     : launch_mma<6, __nv_bfloat16>(x, m, x_stride, packed, scale, zero, bias, n, k, g, y, stream);
  return bits == 4 ? launch_mma<4, __half>(x, m, x_stride, packed, scale, zero, bias, n, k, g, y, stream)
                   : launch_mma<6, __half>(x, m, x_stride, packed, scale, zero, bias, n, k, g, y, stream);
}

}  // namespace cuda
}  // namespace brecq
