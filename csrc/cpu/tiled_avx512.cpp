// AVX-512 GEMV on 4-bit TILE16 weights (format.h): each 32-bit lane of a 64-byte step holds eight
// codes of one of 16 output rows, so a tile's outputs build up lane by lane with no horizontal
// sums, a group's scales are one vector load, and the codes decode without shuffles.
//
// bfloat16 activations: (lane >> 4s) & 0x000f000f | 0x43004300 puts codes s and s + 4 of every
// row into a pair of bfloat16 values 128 + q (see gemv_avx512.cpp), which one VDPBF16PS multiplies
// with the broadcast pair (x[8t + s], x[8t + s + 4]). Four such products cover a step: 128 weights
// in 4 dot-product instructions and 7 integer ones, against 4 + 10 in the row-major kernel, which
// also pays a scale permute and a multiply-add per 128 codes and a reduction per row (1.3-1.5x
// faster from cache, one thread, on the Qwen3-0.6B shapes; bench/README.md).
// float32 activations: eight (lane >> 4i) & 0xf -> float32, multiply-added with broadcast x.
#include <cstdint>
#include <immintrin.h>

#include "brecq/format.h"
#include "gemv.h"

#if defined(__x86_64__) && defined(BRECQ_HAVE_X86_DISPATCH)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")

namespace brecq {
namespace detail {
namespace {

// Code bytes requested ahead of use: a tile is one sequential stream (8 KiB per tile at 1024
// inputs), and 2 KiB ahead kept the GEMV at the rate of a plain read of its bytes.
constexpr int64_t kPrefetchBytes = 2048;

// Activation pairs of the bfloat16 path: dword 4t + s = x[8t + s] | x[8t + s + 4] << 16.
void pair_activations(const uint16_t* x, int64_t k_padded, uint32_t* out) {
  for (int64_t t = 0; t < k_padded / kTileStepCodes; ++t)
    for (int s = 0; s < 4; ++s)
      out[4 * t + s] = static_cast<uint32_t>(x[8 * t + s]) | static_cast<uint32_t>(x[8 * t + s + 4]) << 16;
}

// The next tile's scales and zeros (a stream of their own, small enough to fetch whole).
BRECQ_ALWAYS_INLINE void prefetch_tile_params(const GemvProblem& p, int64_t tile) {
  if (tile >= tile_count(p.n)) return;
  prefetch_range(p.scale + tile * p.groups * kTileRows, 2 * p.groups * kTileRows);
  prefetch_range(p.zero + tile * p.groups * kTileRows, p.groups * kTileRows);
}

// A group's float32 scales, and scale * (zero + offset), the correction's factor.
BRECQ_ALWAYS_INLINE __m512 group_scale(const GemvProblem& p, int64_t tile, int64_t grp, __m512 offset,
                                       __m512* scaled_zero) {
  const int64_t at = (tile * p.groups + grp) * kTileRows;
  const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.scale + at)));
  const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.zero + at))));
  *scaled_zero = _mm512_mul_ps(s, _mm512_add_ps(z, offset));
  return s;
}

// One tile against MR activation rows; out[r] lane i = output row 16 * tile + i, before bias.
// One activation row keeps four accumulators so that the dot products' latency stays hidden;
// with more rows, their chains interleave and two each suffice (registers run short at four).
template <int MR>
void tile_bf16(const GemvProblem& p, const uint32_t* pairs, int64_t r0, int64_t tile, __m512* out) {
  constexpr int kAcc = MR == 1 ? 4 : 2;
  const int64_t steps = p.k_padded / kTileStepCodes, per_group = p.g / kTileStepCodes, pair_row = p.k_padded / 2;
  const uint8_t* w = p.packed + tile * steps * kTileStepBytes;
  const __m512i nibbles = _mm512_set1_epi32(0x000f000f), bias128 = _mm512_set1_epi32(0x43004300);
  const __m512 offset = _mm512_set1_ps(128.0f);  // the decoded values are 128 + q
  __m512 total[MR], correction[MR];
  for (int r = 0; r < MR; ++r) total[r] = correction[r] = _mm512_setzero_ps();
  for (int64_t grp = 0; grp < p.groups; ++grp) {
    __m512 acc[MR][kAcc];
    for (int r = 0; r < MR; ++r)
      for (int a = 0; a < kAcc; ++a) acc[r][a] = _mm512_setzero_ps();
    for (int64_t t = grp * per_group; t < grp * per_group + per_group; ++t) {
      const uint8_t* step = w + t * kTileStepBytes;
      __builtin_prefetch(step + kPrefetchBytes, 0, 3);
      const __m512i lanes = _mm512_loadu_si512(step);
      const __m512i v[4] = {
          _mm512_ternarylogic_epi32(lanes, nibbles, bias128, 0xEA),  // (A & B) | C
          _mm512_ternarylogic_epi32(_mm512_srli_epi32(lanes, 4), nibbles, bias128, 0xEA),
          _mm512_ternarylogic_epi32(_mm512_srli_epi32(lanes, 8), nibbles, bias128, 0xEA),
          _mm512_ternarylogic_epi32(_mm512_srli_epi32(lanes, 12), nibbles, bias128, 0xEA)};
      for (int r = 0; r < MR; ++r) {
        const uint32_t* x = pairs + (r0 + r) * pair_row + 4 * t;
        for (int s = 0; s < 4; ++s)
          acc[r][s % kAcc] = _mm512_dpbf16_ps(acc[r][s % kAcc], (__m512bh)v[s],
                                              (__m512bh)_mm512_set1_epi32(static_cast<int>(x[s])));
      }
    }
    __m512 scaled_zero;
    const __m512 s = group_scale(p, tile, grp, offset, &scaled_zero);
    for (int r = 0; r < MR; ++r) {
      __m512 dot = acc[r][0];
      for (int a = 1; a < kAcc; ++a) dot = _mm512_add_ps(dot, acc[r][a]);
      total[r] = _mm512_fmadd_ps(dot, s, total[r]);
      correction[r] = _mm512_fmadd_ps(scaled_zero, _mm512_set1_ps(p.xsum[(r0 + r) * p.groups + grp]), correction[r]);
    }
  }
  for (int r = 0; r < MR; ++r) out[r] = _mm512_sub_ps(total[r], correction[r]);
}

template <int MR>
void tile_f32(const GemvProblem& p, const uint32_t*, int64_t r0, int64_t tile, __m512* out) {
  const int64_t steps = p.k_padded / kTileStepCodes, per_group = p.g / kTileStepCodes;
  const uint8_t* w = p.packed + tile * steps * kTileStepBytes;
  const __m512i nibble = _mm512_set1_epi32(0xf);
  __m512 total[MR], correction[MR];
  for (int r = 0; r < MR; ++r) total[r] = correction[r] = _mm512_setzero_ps();
  for (int64_t grp = 0; grp < p.groups; ++grp) {
    __m512 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t t = grp * per_group; t < grp * per_group + per_group; ++t) {
      const uint8_t* step = w + t * kTileStepBytes;
      __builtin_prefetch(step + kPrefetchBytes, 0, 3);
      const __m512i lanes = _mm512_loadu_si512(step);
      for (int i = 0; i < kTileStepCodes; ++i) {
        const __m512 q = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(lanes, 4 * i), nibble));
        for (int r = 0; r < MR; ++r)
          acc[r][i % 2] = _mm512_fmadd_ps(q, _mm512_set1_ps(p.x[(r0 + r) * p.k_padded + kTileStepCodes * t + i]),
                                          acc[r][i % 2]);
      }
    }
    __m512 scaled_zero;
    const __m512 s = group_scale(p, tile, grp, _mm512_setzero_ps(), &scaled_zero);
    for (int r = 0; r < MR; ++r) {
      total[r] = _mm512_fmadd_ps(_mm512_add_ps(acc[r][0], acc[r][1]), s, total[r]);
      correction[r] = _mm512_fmadd_ps(scaled_zero, _mm512_set1_ps(p.xsum[(r0 + r) * p.groups + grp]), correction[r]);
    }
  }
  for (int r = 0; r < MR; ++r) out[r] = _mm512_sub_ps(total[r], correction[r]);
}

using TileFn = void (*)(const GemvProblem&, const uint32_t*, int64_t, int64_t, __m512*);

template <TileFn Tile1, TileFn Tile2, TileFn Tile3, TileFn Tile4>
void run_tiles(const GemvProblem& p, const uint32_t* pairs) {
  const int64_t tiles = tile_count(p.n);
#pragma omp parallel for schedule(static) num_threads(p.threads)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    prefetch_tile_params(p, tile + 1);
    const int64_t rows_here = p.n - tile * kTileRows < kTileRows ? p.n - tile * kTileRows : kTileRows;
    const __mmask16 mask = static_cast<__mmask16>((1u << rows_here) - 1u);
    const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(mask, p.bias + tile * kTileRows) : _mm512_setzero_ps();
    for (int64_t r0 = 0; r0 < p.m; r0 += kRowsPerPass) {
      const int64_t pass = p.m - r0 >= kRowsPerPass ? kRowsPerPass : p.m - r0;
      __m512 out[kRowsPerPass];
      switch (pass) {
        case 1: Tile1(p, pairs, r0, tile, out); break;
        case 2: Tile2(p, pairs, r0, tile, out); break;
        case 3: Tile3(p, pairs, r0, tile, out); break;
        default: Tile4(p, pairs, r0, tile, out); break;
      }
      for (int64_t r = 0; r < pass; ++r) {
        const __m512 y = _mm512_add_ps(out[r], bias);
        const int64_t at = (r0 + r) * p.n + tile * kTileRows;
        if (p.y_bf16)  // round to nearest even, as GemvProblem::store
          _mm256_mask_storeu_epi16(p.y_bf16 + at, mask, (__m256i)_mm512_cvtneps_pbh(y));
        else
          _mm512_mask_storeu_ps(p.y + at, mask, y);
      }
    }
  }
}

}  // namespace

bool tiled_gemv_avx512(const GemvProblem& p) {
  static_assert(kRowsPerPass == 4, "tile dispatch below handles up to 4 rows per pass");
  if (p.x_bf16) {
    uint32_t* pairs = reinterpret_cast<uint32_t*>(p.scratch);  // m * k_padded / 2 dwords fit
    for (int64_t r = 0; r < p.m; ++r) pair_activations(p.x_bf16 + r * p.k_padded, p.k_padded, pairs + r * p.k_padded / 2);
    run_tiles<tile_bf16<1>, tile_bf16<2>, tile_bf16<3>, tile_bf16<4>>(p, pairs);
  } else {
    run_tiles<tile_f32<1>, tile_f32<2>, tile_f32<3>, tile_f32<4>>(p, nullptr);
  }
  return true;
}

}  // namespace detail
}  // namespace brecq

#pragma GCC pop_options
#else
namespace brecq {
namespace detail {
bool tiled_gemv_avx512(const GemvProblem&) { return false; }
}  // namespace detail
}  // namespace brecq
#endif
