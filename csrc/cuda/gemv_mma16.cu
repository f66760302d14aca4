// Packed W4/W6 matmul for 1..16 rows of bfloat16/float16 activations on tensor cores, with the
// weights as the A operand of mma.sync m16n8k16 (sm_80+): 16 output features per MMA instead of
// the 8 of gemv_mma.cu, whose A operand is the activations.
//
// Why a second tensor-core kernel: at decode sizes the layer is read once, so the kernel must keep
// enough bytes in flight to cover DRAM latency and spend few instructions per code.
// * A warp issues all loads of a round of K blocks (codes, zero points, scales and activations)
//   before it multiplies any of them, and many warps share an SM (Tuning below).
// * Index arithmetic is 32-bit and loop-invariant offsets are kept in registers: the kernel is
//   close to issue-bound, and 64-bit address math with a division per K block once took more
//   instructions than the dequantization and the MMAs together.
// * Codes become MMA operands without integer-to-float conversions: a 4- or 6-bit code OR-ed into
//   the mantissa of 128.0 (bfloat16, 0x4300) or 1024.0 (float16, 0x6400) is that number plus the
//   code, exactly; one packed subtraction of (magic + zero) leaves code - zero, exactly, for two
//   codes at a time.
// * The lane that feeds rows g and g + 8 of A also holds the accumulators of those two output
//   features, so each lane loads the scales and zero points of its own two rows only.
//
// K order inside a 64-code block: a lane (g, t) loads codes 16t .. 16t+15 of its rows (8 bytes at
// 4 bits, 12 at 6). MMA step s (0..3) takes codes 16t + s and 16t + s + 4 as A columns 2t, 2t+1 and
// codes 16t + 8 + s and 16t + 12 + s as columns 2t+8, 2t+9: at 4 bits, the two codes of a pair sit
// 16 bits apart in one 32-bit word, so one shift and one AND extract both. The B operand
// (activations) takes the same positions, rearranged with byte permutes. A dot product does not
// depend on the order of its terms. tests/test_mma_layout.py models this lane by lane.
//
// The only roundings are float32 accumulation (inside the MMA, then per group after the scale) and
// the final conversion, as in the other GEMV kernels.
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

constexpr int kWarps = 8;      // warps per block
constexpr int kTile = 16;      // output features per tile: the MMA's m
constexpr int kBlockK = 64;    // codes per K block (four k16 MMA steps), inside one group
constexpr int kLaneCodes = mma::kRunCodes;  // codes of one row one lane loads per K block

// Tunings of the kernel, measured side by side on an H100 (bench/gpu_bench.py): how many K blocks a
// warp loads per round (4-bit, 6-bit) and how many blocks of 8 warps an SM must hold, which caps the
// registers a thread may use. More warps with shorter rounds won on the first measurements: the
// kernel issues about one instruction a cycle per scheduler, so latency is better hidden by other
// warps than by longer rounds.
// kMinBlocksHigh applies to 9..16 tokens, whose second set of activations takes registers.
template <int V> struct Tuning;
template <> struct Tuning<0> {  // 32 warps an SM (24 for 9..16 tokens)
  static constexpr int kRound4 = 2, kRound6 = 2, kMinBlocks = 4, kMinBlocksHigh = 3;
};
template <> struct Tuning<1> {  // 24 warps (16)
  static constexpr int kRound4 = 3, kRound6 = 2, kMinBlocks = 3, kMinBlocksHigh = 2;
};
template <> struct Tuning<2> {  // 16 warps
  static constexpr int kRound4 = 4, kRound6 = 3, kMinBlocks = 2, kMinBlocksHigh = 2;
};
template <> struct Tuning<3> {  // 40 warps (24)
  static constexpr int kRound4 = 1, kRound6 = 1, kMinBlocks = 5, kMinBlocksHigh = 3;
};
constexpr int kTunings = 4;

using mma::load_activations;
using mma::Mma;
template <int Bits>
using RowCodes = mma::CodeRun<Bits>;  // 16 codes of one weight row
using mma::load_code_run;

// Code j (0..15) of a lane's run, in the low bits.
template <int Bits, int J>
__device__ inline uint32_t code_at(const RowCodes<Bits>& c) {
  constexpr int bit = Bits * J, word = bit / 32, offset = bit % 32;
  constexpr uint32_t mask = (1u << Bits) - 1u;
  if constexpr (offset + Bits <= 32) {
    return (c.w[word] >> offset) & mask;
  } else {
    return ((c.w[word] >> offset) | (c.w[word + 1] << (32 - offset))) & mask;
  }
}

// Codes J and J + 4 as two 16-bit fields, code J in the low one.
template <int Bits, int J>
__device__ inline uint32_t code_pair(const RowCodes<Bits>& c) {
  if constexpr (Bits == 4) {
    return (c.w[J / 8] >> (4 * (J % 8))) & 0x000f000fu;
  } else {
    return code_at<Bits, J>(c) | (code_at<Bits, J + 4>(c) << 16);
  }
}

// v, which the compiler can no longer recompute from the kernel's parameters: under a tight register
// limit it otherwise re-derives loop-invariant offsets (row clamps, 64-bit compares and all) on
// every round instead of keeping one register each.
__device__ inline uint32_t opaque(uint32_t v) {
  asm volatile("mov.b32 %0, %0;" : "+r"(v));
  return v;
}

// (a & mask) | bits in one LOP3: the compiler emits an AND and an OR for it, as a LOP3 instruction
// takes only one immediate operand.
__device__ inline uint32_t and_or(uint32_t a, uint32_t mask, uint32_t bits) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(a), "r"(mask), "r"(bits));
  return d;
}

// A-operand register: codes (J, J + 4) of one row minus its zero point, as two exact 16-bit floats.
// zz holds magic + zero in both halves.
template <int Bits, int J, typename T>
__device__ inline uint32_t weight_pair(const RowCodes<Bits>& c, uint32_t zz) {
  constexpr uint32_t magic = Mma<T>::kMagic * 0x00010001u;
  if constexpr (Bits == 4) {
    return Mma<T>::sub2(and_or(c.w[J / 8] >> (4 * (J % 8)), 0x000f000fu, magic), zz);
  } else {
    return Mma<T>::sub2(code_pair<Bits, J>(c) | magic, zz);
  }
}

// B-operand registers of step S from the 8 activation words: positions (S, S + 4) and
// (8 + S, 12 + S) of the lane's 16, the lower position in the low half.
template <int S>
__device__ inline void activation_pairs(const uint32_t (&xw)[8], uint32_t& b0, uint32_t& b1) {
  constexpr uint32_t select = (S & 1) ? 0x7632u : 0x5410u;  // high or low halves of both words
  b0 = __byte_perm(xw[S / 2], xw[S / 2 + 2], select);
  b1 = __byte_perm(xw[4 + S / 2], xw[6 + S / 2], select);
}

// The four MMA steps of one K block for one group of 8 tokens: c += A(16 features x 64) . B.
template <int Bits, typename T, int S = 0>
__device__ inline void block_mma(float (&c)[4], const RowCodes<Bits>& lo, const RowCodes<Bits>& hi, uint32_t zz_lo,
                                 uint32_t zz_hi, const uint32_t (&xw)[8]) {
  if constexpr (S < 4) {
    uint32_t b0, b1;
    activation_pairs<S>(xw, b0, b1);
    Mma<T>::run(c, weight_pair<Bits, S, T>(lo, zz_lo), weight_pair<Bits, S, T>(hi, zz_hi),
                weight_pair<Bits, 8 + S, T>(lo, zz_lo), weight_pair<Bits, 8 + S, T>(hi, zz_hi), b0, b1);
    block_mma<Bits, T, S + 1>(c, lo, hi, zz_lo, zz_hi, xw);
  }
}

template <int Bits, typename T, bool kHighTokens, int V>
__global__ void __launch_bounds__(kWarps * 32, kHighTokens ? Tuning<V>::kMinBlocksHigh : Tuning<V>::kMinBlocks)
    gemv_mma16_kernel(
    const uint16_t* __restrict__ x, int m, int64_t x_stride, const uint8_t* __restrict__ packed,
    const uint16_t* __restrict__ scale, const uint8_t* __restrict__ zero, const float* __restrict__ bias,
    int64_t n, int k, int group_shift, int64_t groups, int64_t row_bytes, int k_blocks, int split,
    T* __restrict__ y) {
  constexpr int kRound = Bits == 4 ? Tuning<V>::kRound4 : Tuning<V>::kRound6;
  constexpr int kBlockBytes = kBlockK * Bits / 8, kLaneBytes = kLaneCodes * Bits / 8;
  constexpr int kAcc = kHighTokens ? 8 : 4;
  constexpr int kTokenGroups = kHighTokens ? 2 : 1;
  __shared__ float partial[kWarps][32][kAcc];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gid = lane / 4, tig = lane % 4;
  const int tiles_per_block = kWarps / split;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * tiles_per_block + warp / split) * kTile;
  const int64_t row_lo = row0 + gid, row_hi = row0 + gid + 8;  // this lane's A rows and output features
  // Rows past the end read the last row instead: their products are never written, and the loads
  // need no predicate. Offsets are 32-bit (host-checked) so that they stay in registers: 64-bit row
  // addresses were recomputed, multiplications and all, on every round.
  const int read_lo = static_cast<int>(row_lo < n ? row_lo : n - 1);
  const int read_hi = static_cast<int>(row_hi < n ? row_hi : n - 1);
  const uint32_t codes_lo = opaque(static_cast<uint32_t>(read_lo) * static_cast<uint32_t>(row_bytes) + tig * kLaneBytes);
  const uint32_t codes_hi = opaque(static_cast<uint32_t>(read_hi) * static_cast<uint32_t>(row_bytes) + tig * kLaneBytes);
  const uint32_t meta_lo = opaque(static_cast<uint32_t>(read_lo) * static_cast<uint32_t>(groups));  // scale, zero
  const uint32_t meta_hi = opaque(static_cast<uint32_t>(read_hi) * static_cast<uint32_t>(groups));
  const uint32_t x_token = opaque(static_cast<uint32_t>(gid) * static_cast<uint32_t>(x_stride));  // B column gid
  const uint32_t x_high = 8u * static_cast<uint32_t>(x_stride);  // tokens gid + 8
  const bool token_valid[2] = {gid < m, kHighTokens && gid + 8 < m};

  float acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0.0f;
  for (int kb0 = warp % split; kb0 < k_blocks; kb0 += split * kRound) {
    // The round's loads, all issued before any is used: codes, zero points, scales, activations.
    RowCodes<Bits> lo[kRound], hi[kRound];
    uint32_t z_lo[kRound], z_hi[kRound];
    uint16_t s_lo[kRound], s_hi[kRound];
    uint32_t xw[kRound][kTokenGroups][8];
#pragma unroll
    for (int u = 0; u < kRound; ++u) {
      const int kb = kb0 + u * split;
      const bool live = kb < k_blocks;
      const uint32_t grp = static_cast<uint32_t>(kb) >> group_shift;  // g / 64 K blocks a group (a power of two)
      const uint32_t block_bytes = static_cast<uint32_t>(kb) * kBlockBytes;
      lo[u] = live ? load_code_run<Bits>(packed + (codes_lo + block_bytes)) : RowCodes<Bits>{};
      hi[u] = live ? load_code_run<Bits>(packed + (codes_hi + block_bytes)) : RowCodes<Bits>{};
      z_lo[u] = live ? __ldg(zero + (meta_lo + grp)) : 0u;
      z_hi[u] = live ? __ldg(zero + (meta_hi + grp)) : 0u;
      s_lo[u] = live ? __ldg(scale + (meta_lo + grp)) : 0;
      s_hi[u] = live ? __ldg(scale + (meta_hi + grp)) : 0;
#pragma unroll
      for (int t = 0; t < kTokenGroups; ++t)
        load_activations(xw[u][t], live && token_valid[t], x + (x_token + t * x_high), kb * kBlockK + tig * kLaneCodes,
                         k);
    }
#pragma unroll
    for (int u = 0; u < kRound; ++u) {
      if (kb0 + u * split >= k_blocks) break;
      const uint32_t zz_lo = (Mma<T>::kMagic + z_lo[u]) * 0x00010001u;  // magic + zero, exact
      const uint32_t zz_hi = (Mma<T>::kMagic + z_hi[u]) * 0x00010001u;
      const float sc_lo = __half2float(__ushort_as_half(s_lo[u]));
      const float sc_hi = __half2float(__ushort_as_half(s_hi[u]));
#pragma unroll
      for (int t = 0; t < kTokenGroups; ++t) {
        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        block_mma<Bits, T>(c, lo[u], hi[u], zz_lo, zz_hi, xw[u][t]);
        acc[4 * t + 0] += c[0] * sc_lo;  // feature row_lo, token 8t + 2 tig
        acc[4 * t + 1] += c[1] * sc_lo;  // feature row_lo, token 8t + 2 tig + 1
        acc[4 * t + 2] += c[2] * sc_hi;  // feature row_hi, token 8t + 2 tig
        acc[4 * t + 3] += c[3] * sc_hi;  // feature row_hi, token 8t + 2 tig + 1
      }
    }
  }
  if (split > 1) {  // uniform across the block: every warp reaches the barrier
#pragma unroll
    for (int i = 0; i < kAcc; ++i) partial[warp][lane][i] = acc[i];
    __syncthreads();
    if (warp % split != 0) return;
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0.0f;
    for (int w = warp; w < warp + split; ++w)
#pragma unroll
      for (int i = 0; i < kAcc; ++i) acc[i] += partial[w][lane][i];
  }
#pragma unroll
  for (int i = 0; i < kAcc; ++i) {
    const int token = 2 * tig + (i & 1) + (i >= 4 ? 8 : 0);
    const int64_t feature = (i & 2) ? row_hi : row_lo;
    if (token < m && feature < n)
      y[static_cast<int64_t>(token) * n + feature] = Mma<T>::from_float(acc[i] + (bias ? bias[feature] : 0.0f));
  }
}

// log2(g / 64), or -1 when g is not 64 times a power of two.
int group_shift(int64_t g) {
  if (g < kBlockK || g % kBlockK != 0) return -1;
  const int64_t blocks = g / kBlockK;
  if ((blocks & (blocks - 1)) != 0) return -1;
  int shift = 0;
  while ((int64_t{1} << shift) < blocks) ++shift;
  return shift;
}

// Warps sharing one tile (splitting K): enough warps for one full wave (`warps_per_sm` resident),
// but never more warps per tile than the tile has K blocks.
int split_for(int64_t tiles, int64_t k_blocks, int64_t wave) {
  int split = 1;
  while (split < kWarps && tiles * split < wave && 2 * split <= k_blocks) split *= 2;
  return split;
}

template <int V>
int64_t wave_warps(int m, int sms) {
  return static_cast<int64_t>(sms) * kWarps * (m > 8 ? Tuning<V>::kMinBlocksHigh : Tuning<V>::kMinBlocks);
}

template <int V>
int rounds_per_warp(int64_t n, int64_t k_blocks, int bits, int m, int sms) {
  const int64_t split = split_for((n + kTile - 1) / kTile, k_blocks, wave_warps<V>(m, sms));
  const int64_t per_warp = (k_blocks + split - 1) / split;
  const int round = bits == 4 ? Tuning<V>::kRound4 : Tuning<V>::kRound6;
  return static_cast<int>((per_warp + round - 1) / round);
}

template <int Bits, typename T, int V>
cudaError_t launch(const void* x, int m, int64_t x_stride, const uint8_t* packed, const uint16_t* scale,
                   const uint8_t* zero, const float* bias, int64_t n, int64_t k, int64_t g, void* y,
                   cudaStream_t stream) {
  const int64_t k_blocks = padded_in_features(k, g) / kBlockK;
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int split = split_for(tiles, k_blocks, wave_warps<V>(m, multiprocessor_count()));
  const int64_t tiles_per_block = kWarps / split;
  const unsigned blocks = static_cast<unsigned>((tiles + tiles_per_block - 1) / tiles_per_block);
  const auto* xs = static_cast<const uint16_t*>(x);
  const int64_t groups = num_groups(k, g), row_bytes = packed_row_bytes(k, g, Bits);
  const int shift = group_shift(g);
  if (m > 8)
    gemv_mma16_kernel<Bits, T, true, V><<<blocks, kWarps * 32, 0, stream>>>(
        xs, m, x_stride, packed, scale, zero, bias, n, static_cast<int>(k), shift, groups, row_bytes,
        static_cast<int>(k_blocks), split, static_cast<T*>(y));
  else
    gemv_mma16_kernel<Bits, T, false, V><<<blocks, kWarps * 32, 0, stream>>>(
        xs, m, x_stride, packed, scale, zero, bias, n, static_cast<int>(k), shift, groups, row_bytes,
        static_cast<int>(k_blocks), split, static_cast<T*>(y));
  return cudaGetLastError();
}

template <int V>
cudaError_t launch_tuned(const void* x, OutputType dtype, int m, int64_t x_stride, const uint8_t* packed,
                         const uint16_t* scale, const uint8_t* zero, const float* bias, int64_t n, int64_t k,
                         int bits, int64_t g, void* y, cudaStream_t stream) {
  if (dtype == OutputType::kBFloat16)
    return bits == 4 ? launch<4, __nv_bfloat16, V>(x, m, x_stride, packed, scale, zero, bias, n, k, g, y, stream)
                     : launch<6, __nv_bfloat16, V>(x, m, x_stride, packed, scale, zero, bias, n, k, g, y, stream);
  return bits == 4 ? launch<4, __half, V>(x, m, x_stride, packed, scale, zero, bias, n, k, g, y, stream)
                   : launch<6, __half, V>(x, m, x_stride, packed, scale, zero, bias, n, k, g, y, stream);
}

}  // namespace

namespace {
// The kernel's 32-bit offsets: codes, scales and activations of the whole layer below 2^31.
bool fits_32_bit_offsets(int m, int64_t x_stride, int64_t n, int64_t k, int bits, int64_t g) {
  constexpr int64_t kLimit = int64_t{1} << 31;
  return n * packed_row_bytes(k, g, bits) < kLimit && n * num_groups(k, g) < kLimit &&
         static_cast<int64_t>(m) * x_stride + k < kLimit && padded_in_features(k, g) < kLimit / 2;
}
}  // namespace

GemvChoice choose_tensor_core_gemv(int64_t n, int64_t k, int64_t g, int bits, int m, int sms, bool mma16_supported) {
  if (!mma16_supported) return {GemvKernel::kMma8, 0};
  const int64_t k_blocks = padded_in_features(k, g) / kBlockK;
  // With 9-16 rows, wide layers run fastest with tuning 3 (one K block a round, 40 warps an SM).
  // Per-kernel timings at 16 rows on an H100 and an H200 (bench/README.md): the 1024 -> 151936
  // lm_head 7-10 % faster than with tuning 0, W6 1024 -> 3072 9 % faster than with tuning 2, and
  // W4 1024 -> 3072 the same; 2048 outputs or fewer were slower with it.
  constexpr int64_t kWideOutputs = 3072;
  if (m > 8 && n >= kWideOutputs) return {GemvKernel::kMma16, 3};
  // A layer with tiles for a full wave of the most-warps tuning streams: more warps hide more latency.
  if ((n + kTile - 1) / kTile >= wave_warps<0>(m, sms)) return {GemvKernel::kMma16, 0};
  // A smaller layer is latency-bound: each round of loads is one trip to DRAM, so take the kernel
  // whose warps need the fewest rounds, the 16-feature one (tuning 2, the longest rounds) on a tie.
  if (packed_gemv_mma_rounds(n, k, g, sms) < rounds_per_warp<2>(n, k_blocks, bits, m, sms))
    return {GemvKernel::kMma8, 0};
  return {GemvKernel::kMma16, 2};
}

bool packed_gemv_mma16_supported(const void* x, const uint8_t* packed, OutputType dtype, int bits, int64_t g, int m,
                                 int64_t n, int64_t k, int64_t x_stride) {
  // A group of 64 times a power of two codes: a shift finds a K block's group.
  return packed_gemv_mma_supported(x, packed, dtype, bits, g, m, x_stride) && group_shift(g) >= 0 &&
         fits_32_bit_offsets(m, x_stride, n, k, bits, g);
}

cudaError_t packed_gemv_mma16(const void* x, OutputType dtype, int m, int64_t x_stride, const uint8_t* packed,
                              const uint16_t* scale, const uint8_t* zero, const float* bias, int64_t n, int64_t k,
                              int bits, int64_t g, void* y, cudaStream_t stream, int tuning) {
  if (!packed_gemv_mma16_supported(x, packed, dtype, bits, g, m, n, k, x_stride) || tuning < 0 ||
      tuning >= kTunings || n <= 0)
    return cudaErrorInvalidValue;
  switch (tuning) {
    case 1: return launch_tuned<1>(x, dtype, m, x_stride, packed, scale, zero, bias, n, k, bits, g, y, stream);
    case 2: return launch_tuned<2>(x, dtype, m, x_stride, packed, scale, zero, bias, n, k, bits, g, y, stream);
    case 3: return launch_tuned<3>(x, dtype, m, x_stride, packed, scale, zero, bias, n, k, bits, g, y, stream);
    default: return launch_tuned<0>(x, dtype, m, x_stride, packed, scale, zero, bias, n, k, bits, g, y, stream);
  }
}

}  // namespace cuda
}  // namespace brecq
