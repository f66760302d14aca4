// AVX-512 GEMV and dequantization on 4-, 6- and 8-bit TILE16 weights (format.h): each 32-bit lane
// of a 64-byte step holds codes of one of 16 output rows, so a tile's outputs build up lane by
// lane with no horizontal sums, a group's scales are one vector load, and the codes decode without
// shuffles.
//
// 4 bits, bfloat16 activations: (lane >> 4s) & 0x000f000f | 0x43004300 puts codes s and s + 4 of every
// row into a pair of bfloat16 values 128 + q (see gemv_avx512.cpp), which one VDPBF16PS multiplies
// with the broadcast pair (x[8t + s], x[8t + s + 4]). Four such products cover a step: 128 weights
// in 4 dot-product instructions and 7 integer ones, against 4 + 10 in the row-major kernel, which
// also pays a scale permute and a multiply-add per 128 codes and a reduction per row (1.35-1.6x
// faster from cache, one thread, on the Qwen3-0.6B shapes; bench/README.md).
// float32 activations: eight (lane >> 4i) & 0xf -> float32, multiply-added with broadcast x.
// 6 bits: the same, with each decoded pair's top two bits ORed in from the pair of steps' vector of
// high bits, shifted so that the field of codes s and s + 4 lands on bits 4-5 and 20-21 of the lane.
// 8 bits: a lane holds 4 codes; the same four decodes give the low and the high nibbles of codes
// (0, 2) and (1, 3), and the high nibbles meet activations scaled by 16 (exact in bfloat16):
// sum x (128 + lo) + 16 x (128 + hi) = sum x q + 2176 sum x.
//
// 4 and 8 bits, bfloat16 activations, the default (the float paths above are the fallback): codes
// stay bytes and activations become integers ("digits" below), so VPDPBUSD multiplies 64 byte
// pairs per instruction. A 4-bit step takes one shift, two masks and four VPDPBUSD, against three
// shifts, four ternary-logic ops and four VDPBF16PS above; 8-bit codes need no decoding. On Zen 4
// all of these share the vector pipes, each 512-bit op holding one for two cycles: the 4-bit step
// measured 4.6 cycles against 7.3 from L1 (a scratch loop of each, not kept).
#include <cstdint>
#include <immintrin.h>

#include "brecq/format.h"
#include "brecq/kernels.h"
#include "gemv.h"
#include "tile_plan.h"

#if defined(__x86_64__) && defined(BRECQ_HAVE_X86_DISPATCH)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,avx512vbmi,avx2,fma,f16c")
#include "dequant_avx512.h"

namespace brecq {
namespace detail {
namespace {

// Code bytes requested ahead of use: a thread's tiles are one sequential stream (8 KiB per tile at
// 1024 inputs). When memory is slow any distance keeps up; when it is fast (a read of 50-60 GB/s on
// 2 MiB pages, or weights in L3) 4 KiB beat 2 KiB by 3-11 % and longer distances lost at slow
// minutes (scratch builds of this file with 0-12 KiB, timed round-robin in one process). A later
// A/B through the Python op path, with 0, 1, 4 and 8 KiB, found no difference at fast or slow
// periods (bench/README.md, "Where a decode-sized call's time goes"): a small lever either way.
constexpr int64_t kPrefetchBytes = 4096;

// Activation pairs of the bfloat16 path: dword 4t + s = x[8t + s] | x[8t + s + 4] << 16.
void pair_activations(const uint16_t* x, int64_t k_padded, uint32_t* out) {
  for (int64_t t = 0; t < k_padded / kTileStepCodes; ++t)
    for (int s = 0; s < 4; ++s)
      out[4 * t + s] = static_cast<uint32_t>(x[8 * t + s]) | static_cast<uint32_t>(x[8 * t + s + 4]) << 16;
}

// 8 bits: dwords 4u..4u+3 = (x0, x2), 16 (x0, x2), (x1, x3), 16 (x1, x3) of codes 4u..4u+3.
inline uint32_t times16_bf16(uint16_t x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float value;
  __builtin_memcpy(&value, &bits, 4);
  value *= 16.0f;  // exact: a power of two
  __builtin_memcpy(&bits, &value, 4);
  return bits >> 16;
}
void pair_activations8(const uint16_t* x, int64_t k_padded, uint32_t* out) {
  for (int64_t u = 0; u < k_padded / 4; ++u) {
    const uint16_t* c = x + 4 * u;
    out[4 * u] = static_cast<uint32_t>(c[0]) | static_cast<uint32_t>(c[2]) << 16;
    out[4 * u + 1] = times16_bf16(c[0]) | times16_bf16(c[2]) << 16;
    out[4 * u + 2] = static_cast<uint32_t>(c[1]) | static_cast<uint32_t>(c[3]) << 16;
    out[4 * u + 3] = times16_bf16(c[1]) | times16_bf16(c[3]) << 16;
  }
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

// The end of a group: its dot products scaled into the totals, and its share of the zero-point
// correction.
template <int MR, int kAcc>
BRECQ_ALWAYS_INLINE void close_group(const GemvProblem& p, int64_t r0, int64_t tile, int64_t grp, __m512 offset,
                                     const __m512 (&acc)[MR][kAcc], __m512 (&total)[MR], __m512 (&correction)[MR]) {
  __m512 scaled_zero;
  const __m512 s = group_scale(p, tile, grp, offset, &scaled_zero);
  for (int r = 0; r < MR; ++r) {
    __m512 dot = acc[r][0];
    for (int a = 1; a < kAcc; ++a) dot = _mm512_add_ps(dot, acc[r][a]);
    total[r] = _mm512_fmadd_ps(dot, s, total[r]);
    correction[r] = _mm512_fmadd_ps(scaled_zero, _mm512_set1_ps(p.xsum[(r0 + r) * p.groups + grp]), correction[r]);
  }
}

template <int MR, int Bits>
void tile_f32(const GemvProblem& p, const uint32_t*, int64_t r0, int64_t tile, __m512* out) {
  constexpr int64_t kCodes = Bits == 4 ? kTileStepCodes : 4;  // codes of a row per 64-byte step
  const int64_t per_group = p.g / kCodes;
  const uint8_t* w = p.packed + tile * tile_code_bytes(p.k, p.g, Bits);
  const __m512i mask = _mm512_set1_epi32((1 << Bits) - 1);
  __m512 total[MR], correction[MR];
  for (int r = 0; r < MR; ++r) total[r] = correction[r] = _mm512_setzero_ps();
  for (int64_t grp = 0; grp < p.groups; ++grp) {
    prefetch_group_params(p, tile * p.groups + grp + kParamsAheadGroups);
    __m512 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t t = grp * per_group; t < grp * per_group + per_group; ++t) {
      const uint8_t* step = w + t * kTileStepBytes;
      __builtin_prefetch(step + kPrefetchBytes, 0, 3);
      const __m512i lanes = _mm512_loadu_si512(step);
      for (int i = 0; i < kCodes; ++i) {
        const __m512 q = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(lanes, Bits * i), mask));
        for (int r = 0; r < MR; ++r)
          acc[r][i % 2] = _mm512_fmadd_ps(q, _mm512_set1_ps(p.x[(r0 + r) * p.k_padded + kCodes * t + i]),
                                          acc[r][i % 2]);
      }
    }
    close_group<MR, 2>(p, r0, tile, grp, _mm512_setzero_ps(), acc, total, correction);
  }
  for (int r = 0; r < MR; ++r) out[r] = _mm512_sub_ps(total[r], correction[r]);
}

// The top bits of codes s and s + 4 of step p of a 6-bit pair, at bits 4-5 and 20-21 of each lane
// (field f = 4p + s sits at bits 2f and 16 + 2f of the pair's high-bit vector).
template <int Field>
BRECQ_ALWAYS_INLINE __m512i high_bits_at_4(__m512i high) {
  if constexpr (Field < 2) return _mm512_slli_epi32(high, 4 - 2 * Field);
  else if constexpr (Field == 2) return high;
  else return _mm512_srli_epi32(high, 2 * Field - 4);
}

// Codes s and s + 4 of a 6-bit step as bfloat16 pairs 128 + q.
template <int P, int S>
BRECQ_ALWAYS_INLINE __m512i six_bit_pair(__m512i nibble_lanes, __m512i high) {
  const __m512i low = _mm512_ternarylogic_epi32(S == 0 ? nibble_lanes : _mm512_srli_epi32(nibble_lanes, 4 * S),
                                                _mm512_set1_epi32(0x000f000f), _mm512_set1_epi32(0x43004300), 0xEA);
  return _mm512_ternarylogic_epi32(high_bits_at_4<4 * P + S>(high), _mm512_set1_epi32(0x00300030), low, 0xEA);
}

// ---- bfloat16 activations: step decoders and the kernel they plug into ---------------------
// A decoder turns kBytes of a tile into kVectors vectors of bfloat16 code pairs; vector j meets
// activation pair dword j of the call (pair_activations*). Constructors are written out: GCC
// compiles implicit ones without the target pragma.
struct NibbleStep {  // 4 bits (8 codes a row) and 8 bits (4 codes a row, as low and high nibbles)
  static constexpr int kVectors = 4;
  static constexpr int64_t kBytes = kTileStepBytes;
  __m512i nibbles, bias128;
  NibbleStep() : nibbles(_mm512_set1_epi32(0x000f000f)), bias128(_mm512_set1_epi32(0x43004300)) {}
  BRECQ_ALWAYS_INLINE void operator()(const uint8_t* step, __m512i (&v)[kVectors]) const {
    const __m512i lanes = _mm512_loadu_si512(step);
    v[0] = _mm512_ternarylogic_epi32(lanes, nibbles, bias128, 0xEA);  // (A & B) | C
    v[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(lanes, 4), nibbles, bias128, 0xEA);
    v[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(lanes, 8), nibbles, bias128, 0xEA);
    v[3] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(lanes, 12), nibbles, bias128, 0xEA);
  }
};
// One tile against MR activation rows; out[r] lane i = output row 16 * tile + i, before bias.
// One activation row keeps four accumulators so that the dot products' latency stays hidden;
// with more rows, their chains interleave and two each suffice (registers run short at four).
// Bits (4 or 8) sets the codes per decoder call and the offset the decoded values carry: 128 + q,
// or for 8 bits 128 + lo and 16 (128 + hi).
template <int MR, int Bits, class Decode>
void tile_bf16(const GemvProblem& p, const uint32_t* pairs, int64_t r0, int64_t tile, __m512* out) {
  constexpr int kAcc = MR == 1 ? 4 : 2;
  constexpr int kVectors = Decode::kVectors;
  constexpr int64_t kCodes = Bits == 8 ? 4 : kTileStepCodes;  // codes of a row per decoder call
  const int64_t calls_per_group = p.g / kCodes, pair_row = kVectors * (p.k_padded / kCodes);
  const uint8_t* w = p.packed + tile * tile_code_bytes(p.k, p.g, Bits);
  const __m512 offset = _mm512_set1_ps(Bits == 8 ? 128.0f * 17.0f : 128.0f);
  const Decode decode;
  __m512 total[MR], correction[MR];
  for (int r = 0; r < MR; ++r) total[r] = correction[r] = _mm512_setzero_ps();
  for (int64_t grp = 0; grp < p.groups; ++grp) {
    prefetch_group_params(p, tile * p.groups + grp + kParamsAheadGroups);
    __m512 acc[MR][kAcc];
    for (int r = 0; r < MR; ++r)
      for (int a = 0; a < kAcc; ++a) acc[r][a] = _mm512_setzero_ps();
    for (int64_t u = grp * calls_per_group; u < grp * calls_per_group + calls_per_group; ++u) {
      const uint8_t* bytes = w + u * Decode::kBytes;
      for (int64_t line = 0; line < Decode::kBytes; line += 64) __builtin_prefetch(bytes + kPrefetchBytes + line, 0, 3);
      __m512i v[kVectors];
      decode(bytes, v);
      for (int r = 0; r < MR; ++r) {
        const uint32_t* x = pairs + (r0 + r) * pair_row + kVectors * u;
        for (int j = 0; j < kVectors; ++j)
          acc[r][j % kAcc] = _mm512_dpbf16_ps(acc[r][j % kAcc], (__m512bh)v[j],
                                              (__m512bh)_mm512_set1_epi32(static_cast<int>(x[j])));
      }
    }
    close_group<MR, kAcc>(p, r0, tile, grp, offset, acc, total, correction);
  }
  for (int r = 0; r < MR; ++r) out[r] = _mm512_sub_ps(total[r], correction[r]);
}

// 6 bits: the same loop over pairs of steps, written out. Run through tile_bf16 with a decoder
// struct it measured 1.3x slower (brecq_gemv_bench 6 1024 3072 1 1 1 2000 0 1: 21.7 against
// 29.9 GB/s) for machine code that differs only in its scaffolding.
template <int MR>
void tile6_bf16(const GemvProblem& p, const uint32_t* pairs, int64_t r0, int64_t tile, __m512* out) {
  constexpr int kAcc = MR == 1 ? 4 : 2;
  const int64_t per_group = p.g / kTileStepCodes, pair_row = p.k_padded / 2;
  const uint8_t* w = p.packed + tile * tile_code_bytes(p.k, p.g, 6);
  const __m512 offset = _mm512_set1_ps(128.0f);
  __m512 total[MR], correction[MR];
  for (int r = 0; r < MR; ++r) total[r] = correction[r] = _mm512_setzero_ps();
  for (int64_t grp = 0; grp < p.groups; ++grp) {
    prefetch_group_params(p, tile * p.groups + grp + kParamsAheadGroups);
    __m512 acc[MR][kAcc];
    for (int r = 0; r < MR; ++r)
      for (int a = 0; a < kAcc; ++a) acc[r][a] = _mm512_setzero_ps();
    for (int64_t t = grp * per_group; t < grp * per_group + per_group; t += 2) {
      const uint8_t* pair = w + (t / 2) * kTile6PairBytes;
      for (int line = 0; line < 3; ++line) __builtin_prefetch(pair + kPrefetchBytes + 64 * line, 0, 3);
      const __m512i high = _mm512_loadu_si512(pair + 2 * kTileStepBytes);
      const __m512i first = _mm512_loadu_si512(pair), second = _mm512_loadu_si512(pair + kTileStepBytes);
      const __m512i v[8] = {six_bit_pair<0, 0>(first, high), six_bit_pair<0, 1>(first, high),
                            six_bit_pair<0, 2>(first, high), six_bit_pair<0, 3>(first, high),
                            six_bit_pair<1, 0>(second, high), six_bit_pair<1, 1>(second, high),
                            six_bit_pair<1, 2>(second, high), six_bit_pair<1, 3>(second, high)};
      for (int r = 0; r < MR; ++r) {
        const uint32_t* x = pairs + (r0 + r) * pair_row + 4 * t;  // the pair's two steps: 8 dwords
        for (int j = 0; j < 8; ++j)
          acc[r][j % kAcc] = _mm512_dpbf16_ps(acc[r][j % kAcc], (__m512bh)v[j],
                                              (__m512bh)_mm512_set1_epi32(static_cast<int>(x[j])));
      }
    }
    close_group<MR, kAcc>(p, r0, tile, grp, offset, acc, total, correction);
  }
  for (int r = 0; r < MR; ++r) out[r] = _mm512_sub_ps(total[r], correction[r]);
}

// Code c of step P of a 6-bit pair as float32.
template <int P, int C>
BRECQ_ALWAYS_INLINE __m512 six_bit_code_f32(__m512i nibble_lanes, __m512i high) {
  const __m512i low = _mm512_and_si512(_mm512_srli_epi32(nibble_lanes, 4 * C), _mm512_set1_epi32(0xf));
  const __m512i top = C < 4 ? high_bits_at_4<4 * P + C % 4>(high) : _mm512_srli_epi32(high_bits_at_4<4 * P + C % 4>(high), 16);
  return _mm512_cvtepi32_ps(_mm512_ternarylogic_epi32(top, _mm512_set1_epi32(0x30), low, 0xEA));
}

template <int P, int C, int MR>
BRECQ_ALWAYS_INLINE void six_bit_f32_code(const GemvProblem& p, int64_t r0, int64_t at, __m512i lanes, __m512i high,
                                          __m512 (&acc)[MR][2]) {
  const __m512 q = six_bit_code_f32<P, C>(lanes, high);
  for (int r = 0; r < MR; ++r)
    acc[r][C % 2] = _mm512_fmadd_ps(q, _mm512_set1_ps(p.x[(r0 + r) * p.k_padded + at + C]), acc[r][C % 2]);
}

template <int P, int MR>
BRECQ_ALWAYS_INLINE void six_bit_f32_step(const GemvProblem& p, int64_t r0, int64_t at, __m512i lanes, __m512i high,
                                          __m512 (&acc)[MR][2]) {
  six_bit_f32_code<P, 0>(p, r0, at, lanes, high, acc);
  six_bit_f32_code<P, 1>(p, r0, at, lanes, high, acc);
  six_bit_f32_code<P, 2>(p, r0, at, lanes, high, acc);
  six_bit_f32_code<P, 3>(p, r0, at, lanes, high, acc);
  six_bit_f32_code<P, 4>(p, r0, at, lanes, high, acc);
  six_bit_f32_code<P, 5>(p, r0, at, lanes, high, acc);
  six_bit_f32_code<P, 6>(p, r0, at, lanes, high, acc);
  six_bit_f32_code<P, 7>(p, r0, at, lanes, high, acc);
}

template <int MR>
void tile6_f32(const GemvProblem& p, const uint32_t*, int64_t r0, int64_t tile, __m512* out) {
  const int64_t per_group = p.g / kTileStepCodes;
  const uint8_t* w = p.packed + tile * tile_code_bytes(p.k, p.g, 6);
  __m512 total[MR], correction[MR];
  for (int r = 0; r < MR; ++r) total[r] = correction[r] = _mm512_setzero_ps();
  for (int64_t grp = 0; grp < p.groups; ++grp) {
    prefetch_group_params(p, tile * p.groups + grp + kParamsAheadGroups);
    __m512 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t t = grp * per_group; t < grp * per_group + per_group; t += 2) {
      const uint8_t* pair = w + (t / 2) * kTile6PairBytes;
      for (int line = 0; line < 3; ++line) __builtin_prefetch(pair + kPrefetchBytes + 64 * line, 0, 3);
      const __m512i high = _mm512_loadu_si512(pair + 2 * kTileStepBytes);
      six_bit_f32_step<0>(p, r0, kTileStepCodes * t, _mm512_loadu_si512(pair), high, acc);
      six_bit_f32_step<1>(p, r0, kTileStepCodes * (t + 1), _mm512_loadu_si512(pair + kTileStepBytes), high, acc);
    }
    close_group<MR, 2>(p, r0, tile, grp, _mm512_setzero_ps(), acc, total, correction);
  }
  for (int r = 0; r < MR; ++r) out[r] = _mm512_sub_ps(total[r], correction[r]);
}

// ---- bfloat16 activations as integer digits (digits.h) ---------------------------------------
#include "digits.h"

// acc + the 16 lanes' dot products of 4 code bytes with the 4 signed digit bytes at *digits. The
// broadcast rides in the instruction (GCC emits _mm512_set1_epi32 as a VPBROADCASTD of its own,
// one more vector op per dot product).
BRECQ_ALWAYS_INLINE __m512i dot_digits(__m512i acc, __m512i codes, const uint32_t* digits) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(codes), "m"(*digits));
  return acc;
}

// 6 bits as bytes: the multishift control that moves the top two bits of the step's codes
// (2b + odd, b = 0..3) of step P of a pair to bits 4-5 of byte b of each 32-bit lane (the lanes of a
// qword are two rows; a window start below 0 wraps within the qword and still lands right). Code c
// of step P has its top bits at 2(4P + c) for c < 4 and 16 + 2(4P + c - 4) otherwise (FORMAT.md).
constexpr int64_t six_bit_top_control(int step, int odd) {
  uint64_t control = 0;
  for (int b = 0; b < 4; ++b) {
    const int c = 2 * b + odd;
    const int at = c < 4 ? 2 * (4 * step + c) : 16 + 2 * (4 * step + c - 4);
    control |= static_cast<uint64_t>((at - 4) & 63) << (8 * b);
    control |= static_cast<uint64_t>((at + 28) & 63) << (8 * (b + 4));
  }
  return static_cast<int64_t>(control);
}

// One tile against MR rows of digits (activation_digits; the m rows of factors and then of sums
// follow the m rows of digits), a round of 8 codes a row at a time: one 64-byte step at 4 bits,
// split into low and high nibbles; two steps at 8 bits; at 6 bits one step of a pair, its low and
// high nibbles each joined by their top two bits from the pair's third vector (one multishift and
// one ternary-logic op each), so 6-bit codes meet the digits as bytes 0..63 in the 4-bit order.
// Per row, accumulators 0 and 1 take the two code vectors' high digits, 2 and 3 their low ones, so
// each takes one VPDPBUSD a round.
// Software prefetch in the integer kernels: 4-bit codes only. Scratch builds of this kernel with and
// without it, alternated for 20 minutes with `brecq_gemv_bench` from memory and sorted by the plain
// read rate measured beside each run: where the host read 48-64 GB/s, no prefetch ran the 8-bit
// lm_head (151936x1024) at a median 95 % of the read against 84 %, and W6 2048x1024 at 90 % against
// 82 %, while W4 3072x1024 lost 2-3 points (84 against 86 %); where it read 30-38 GB/s all were at
// 93-98 % either way.
template <int MR, int Bits>
void tile_digits(const GemvProblem& p, const uint32_t* digits, int64_t r0, int64_t tile, __m512* out) {
  constexpr int kRoundsPerLoad = Bits == 6 ? 2 : 1;  // a 6-bit pair of steps is loaded whole
  constexpr int64_t kLoadBytes = Bits == 4 ? kTileStepBytes : Bits == 6 ? kTile6PairBytes : 2 * kTileStepBytes;
  const int64_t loads_per_group = p.g / (8 * kRoundsPerLoad), digit_row = p.k_padded / 2;
  const float* factor = reinterpret_cast<const float*>(digits + p.m * digit_row);
  const float* rounded_sum = factor + p.m * p.groups;
  const uint8_t* w = p.packed + tile * tile_code_bytes(p.k, p.g, Bits);
  const __m512i low_nibbles = _mm512_set1_epi32(0x0f0f0f0f), top_bits = _mm512_set1_epi32(0x30303030);
  __m512 total[MR], correction[MR];
  for (int r = 0; r < MR; ++r) total[r] = correction[r] = _mm512_setzero_ps();
  for (int64_t grp = 0; grp < p.groups; ++grp) {
    prefetch_group_params(p, tile * p.groups + grp + kParamsAheadGroups);
    __m512i acc[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int a = 0; a < 4; ++a) acc[r][a] = _mm512_setzero_si512();
    for (int64_t l = grp * loads_per_group; l < grp * loads_per_group + loads_per_group; ++l) {
      const uint8_t* bytes = w + l * kLoadBytes;
      if constexpr (Bits == 4)  // see the note above tile_digits
        for (int64_t line = 0; line < kLoadBytes; line += 64) __builtin_prefetch(bytes + kPrefetchBytes + line, 0, 3);
      for (int step = 0; step < kRoundsPerLoad; ++step) {
        __m512i first, second;
        if constexpr (Bits == 8) {
          first = _mm512_loadu_si512(bytes);
          second = _mm512_loadu_si512(bytes + kTileStepBytes);
        } else {
          const __m512i lanes = _mm512_loadu_si512(bytes + step * kTileStepBytes);
          first = _mm512_and_si512(lanes, low_nibbles);
          second = _mm512_and_si512(_mm512_srli_epi32(lanes, 4), low_nibbles);
          if constexpr (Bits == 6) {
            const __m512i high = _mm512_loadu_si512(bytes + 2 * kTileStepBytes);
            const __m512i even_top = _mm512_multishift_epi64_epi8(
                _mm512_set1_epi64(step == 0 ? six_bit_top_control(0, 0) : six_bit_top_control(1, 0)), high);
            const __m512i odd_top = _mm512_multishift_epi64_epi8(
                _mm512_set1_epi64(step == 0 ? six_bit_top_control(0, 1) : six_bit_top_control(1, 1)), high);
            first = _mm512_ternarylogic_epi32(even_top, top_bits, first, 0xEA);  // (A & B) | C
            second = _mm512_ternarylogic_epi32(odd_top, top_bits, second, 0xEA);
          }
        }
        const int64_t u = l * kRoundsPerLoad + step;
        for (int r = 0; r < MR; ++r) {
          const uint32_t* d = digits + (r0 + r) * digit_row + 4 * u;
          acc[r][0] = dot_digits(acc[r][0], first, d);
          acc[r][1] = dot_digits(acc[r][1], second, d + 1);
          acc[r][2] = dot_digits(acc[r][2], first, d + 2);
          acc[r][3] = dot_digits(acc[r][3], second, d + 3);
        }
      }
    }
    __m512 scaled_zero;
    const __m512 s = group_scale(p, tile, grp, _mm512_setzero_ps(), &scaled_zero);
    for (int r = 0; r < MR; ++r) {
      const __m512i high = _mm512_add_epi32(acc[r][0], acc[r][1]), low = _mm512_add_epi32(acc[r][2], acc[r][3]);
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(high, 8), low));
      total[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(s, _mm512_set1_ps(factor[(r0 + r) * p.groups + grp])), total[r]);
      correction[r] = _mm512_fmadd_ps(scaled_zero, _mm512_set1_ps(rounded_sum[(r0 + r) * p.groups + grp]),
                                      correction[r]);
    }
  }
  for (int r = 0; r < MR; ++r) out[r] = _mm512_sub_ps(total[r], correction[r]);
}

using TileFn = void (*)(const GemvProblem&, const uint32_t*, int64_t, int64_t, __m512*);

// One tile's outputs for every activation row, through the kernel instantiated for each count of
// rows in a pass.
template <TileFn Tile1, TileFn Tile2, TileFn Tile3, TileFn Tile4>
void run_tile(const GemvProblem& p, const uint32_t* pairs, int64_t tile) {
  prefetch_first_group_params(p, tile);
  const int64_t rows_here = p.n - tile * kTileRows < kTileRows ? p.n - tile * kTileRows : kTileRows;
  const __mmask16 mask = static_cast<__mmask16>((1u << rows_here) - 1u);
  const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(mask, p.bias + tile * kTileRows) : _mm512_setzero_ps();
  const bool native_bf16 = p.y_bf16 && bf16_instructions();
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
        _mm256_mask_storeu_epi16(p.y_bf16 + at, mask, bf16_bits(y, native_bf16));
      else
        _mm512_mask_storeu_ps(p.y + at, mask, y);
    }
  }
}

template <TileFn Tile1, TileFn Tile2, TileFn Tile3, TileFn Tile4>
TilePlan plan_of(const uint32_t* activations) {
  TilePlan plan;
  plan.run = run_tile<Tile1, Tile2, Tile3, Tile4>;
  plan.activations = activations;
  return plan;
}

// ---- dequantization into dense rows (the GEMM path's workspace) -----------------------------
// 4 and 8 bits: four 64-byte steps of a tile hold 16 bytes of each of its 16 rows, one dword per
// row and step. A 4x4 transpose of dwords inside each 128-bit lane gathers each row's 16 bytes,
// which are then exactly a row-major run of 32 (4-bit) or 16 (8-bit) codes, decoded and stored as
// the row-major kernel does.
template <int Lane, int Bits>
BRECQ_ALWAYS_INLINE void dequantize_lane_rows(const __m512i (&by_row)[4], const uint16_t* scale, const uint8_t* zero,
                                              int64_t rows_here, int64_t left, char* out, int64_t row_stride,
                                              bool out_bf16, bool native_bf16) {
  for (int j = 0; j < 4; ++j) {
    const int64_t r = 4 * Lane + j;  // lane Lane of by_row[j] holds row 4 * Lane + j
    if (r >= rows_here) return;
    const __m128i bytes = _mm512_extracti32x4_epi32(by_row[j], Lane);
    __m512 first, second;
    if constexpr (Bits == 4) {
      nibbles_to_f32(bytes, first, second);
    } else {
      first = second = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
      left = left < 16 ? left : 16;  // 16 codes: second is never stored
    }
    store_dequantized(first, second, _mm512_set1_ps(_cvtsh_ss(scale[r])),
                      _mm512_set1_ps(static_cast<float>(zero[r])), left, out + r * row_stride, out_bf16, native_bf16);
  }
}

template <int Bits>
void dequantize_tiles(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, int64_t n, int64_t k,
                      int64_t g, void* out, bool out_bf16, int threads) {
  constexpr int64_t kCodes = Bits == 4 ? kTileStepCodes : 4;  // codes of a row per 64-byte step
  const int64_t groups = num_groups(k, g), out_bytes = out_bf16 ? 2 : 4, tile_bytes = tile_code_bytes(k, g, Bits);
  const bool native_bf16 = bf16_instructions();
  const int64_t row_stride = k * out_bytes;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t tile = 0; tile < tile_count(n); ++tile) {
    const uint8_t* w = codes + tile * tile_bytes;
    const int64_t rows_here = n - tile * kTileRows < kTileRows ? n - tile * kTileRows : kTileRows;
    char* tile_out = static_cast<char*>(out) + tile * kTileRows * row_stride;
    for (int64_t c = 0; c < k; c += 4 * kCodes) {  // g a multiple of 4 * kCodes: four steps lie in one group
      const int64_t t = c / kCodes, at = (tile * groups + c / g) * kTileRows;
      const __m512i s0 = _mm512_loadu_si512(w + t * kTileStepBytes), s1 = _mm512_loadu_si512(w + (t + 1) * kTileStepBytes);
      const __m512i s2 = _mm512_loadu_si512(w + (t + 2) * kTileStepBytes), s3 = _mm512_loadu_si512(w + (t + 3) * kTileStepBytes);
      const __m512i a = _mm512_unpacklo_epi32(s0, s1), b = _mm512_unpackhi_epi32(s0, s1);
      const __m512i d = _mm512_unpacklo_epi32(s2, s3), e = _mm512_unpackhi_epi32(s2, s3);
      const __m512i by_row[4] = {_mm512_unpacklo_epi64(a, d), _mm512_unpackhi_epi64(a, d),
                                 _mm512_unpacklo_epi64(b, e), _mm512_unpackhi_epi64(b, e)};
      char* at_c = tile_out + c * out_bytes;
      dequantize_lane_rows<0, Bits>(by_row, scale + at, zero + at, rows_here, k - c, at_c, row_stride, out_bf16,
                                    native_bf16);
      dequantize_lane_rows<1, Bits>(by_row, scale + at, zero + at, rows_here, k - c, at_c, row_stride, out_bf16,
                                    native_bf16);
      dequantize_lane_rows<2, Bits>(by_row, scale + at, zero + at, rows_here, k - c, at_c, row_stride, out_bf16,
                                    native_bf16);
      dequantize_lane_rows<3, Bits>(by_row, scale + at, zero + at, rows_here, k - c, at_c, row_stride, out_bf16,
                                    native_bf16);
    }
  }
}

// 6 bits: per pair of steps, the 16 codes of each row come out as 16 column vectors (lanes = rows),
// dequantized, then turned into 16 row vectors by a 16x16 transpose in registers.
BRECQ_ALWAYS_INLINE void transpose16(__m512 (&v)[16]) {
  __m512 t[16], u[16], w[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j) {
      w[8 * h + j] = _mm512_shuffle_f32x4(u[8 * h + j], u[8 * h + 4 + j], 0x88);
      w[8 * h + 4 + j] = _mm512_shuffle_f32x4(u[8 * h + j], u[8 * h + 4 + j], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    v[j] = _mm512_shuffle_f32x4(w[j], w[8 + j], 0x88);
    v[8 + j] = _mm512_shuffle_f32x4(w[j], w[8 + j], 0xDD);
  }
}

// (q - z) * s of code C of a 6-bit pair for the 16 rows, the row-major kernel's arithmetic.
template <int C>
BRECQ_ALWAYS_INLINE void six_bit_columns(__m512 (&v)[16], __m512i first, __m512i second, __m512i high, __m512 s,
                                         __m512 z) {
  v[C] = _mm512_mul_ps(_mm512_sub_ps(six_bit_code_f32<C / 8, C % 8>(C < 8 ? first : second, high), z), s);
  if constexpr (C + 1 < 16) six_bit_columns<C + 1>(v, first, second, high, s, z);
}

void dequantize_tiles6(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, int64_t n, int64_t k,
                       int64_t g, void* out, bool out_bf16, int threads) {
  const int64_t tile_bytes = tile_code_bytes(k, g, 6), groups = num_groups(k, g);
  const bool native_bf16 = bf16_instructions();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t tile = 0; tile < tile_count(n); ++tile) {
    const uint8_t* w = codes + tile * tile_bytes;
    const int64_t rows_here = n - tile * kTileRows < kTileRows ? n - tile * kTileRows : kTileRows;
    for (int64_t c0 = 0; c0 < k; c0 += 2 * kTileStepCodes) {  // g % 16 == 0: a pair lies in one group
      const int64_t at = (tile * groups + c0 / g) * kTileRows;
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scale + at)));
      const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zero + at))));
      const uint8_t* pair = w + (c0 / 16) * kTile6PairBytes;
      __m512 v[16];
      six_bit_columns<0>(v, _mm512_loadu_si512(pair), _mm512_loadu_si512(pair + kTileStepBytes),
                         _mm512_loadu_si512(pair + 2 * kTileStepBytes), s, z);
      transpose16(v);
      const int64_t left = k - c0;
      const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
      for (int64_t r = 0; r < rows_here; ++r) {
        const int64_t at_out = (tile * kTileRows + r) * k + c0;
        if (out_bf16)
          _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + at_out, mask, bf16_bits(v[r], native_bf16));
        else
          _mm512_mask_storeu_ps(static_cast<float*>(out) + at_out, mask, v[r]);
      }
    }
  }
}

}  // namespace

bool dequantize_tiled_avx512(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, int64_t n,
                             int64_t k, int bits, int64_t g, void* out, bool out_bf16, int threads) {
  if (bits == 6 && tile16_supports(bits, g)) {
    dequantize_tiles6(codes, scale, zero, n, k, g, out, out_bf16, threads);
    return true;
  }
  if (bits == 4 && g % 32 == 0) {
    dequantize_tiles<4>(codes, scale, zero, n, k, g, out, out_bf16, threads);
    return true;
  }
  if (bits == 8 && g % 16 == 0) {
    dequantize_tiles<8>(codes, scale, zero, n, k, g, out, out_bf16, threads);
    return true;
  }
  return false;
}

namespace {

// Prepares p's activations in p.scratch (integer digits, or bfloat16 pairs) and picks its kernel;
// false when TILE16 does not hold p's width and group size.
bool plan_tiles(const GemvProblem& p, TilePlan* plan) {
  static_assert(kRowsPerPass == 4, "tile dispatch handles up to 4 rows per pass");
  if (!tile16_supports(p.bits, p.g)) return false;
  if (p.x_bf16) {
    uint32_t* pairs = reinterpret_cast<uint32_t*>(p.scratch);  // m * k_padded dwords fit
    if (p.g <= digit_max_group(p.bits)) {
      uint32_t* digits = pairs;  // m * k_padded / 2 dwords, then m * groups factors and as many sums
      float* factor = reinterpret_cast<float*>(digits + p.m * p.k_padded / 2);
      float* rounded_sum = factor + p.m * p.groups;
      bool representable = true;
      for (int64_t r = 0; r < p.m && representable; ++r)
        representable = activation_digits(p.x + r * p.k_padded, p.k_padded, p.g, p.bits, digits + r * p.k_padded / 2,
                                          factor + r * p.groups, rounded_sum + r * p.groups);
      if (representable) {
        if (p.bits == 4)
          *plan = plan_of<tile_digits<1, 4>, tile_digits<2, 4>, tile_digits<3, 4>, tile_digits<4, 4>>(digits);
        else if (p.bits == 6)
          *plan = plan_of<tile_digits<1, 6>, tile_digits<2, 6>, tile_digits<3, 6>, tile_digits<4, 6>>(digits);
        else
          *plan = plan_of<tile_digits<1, 8>, tile_digits<2, 8>, tile_digits<3, 8>, tile_digits<4, 8>>(digits);
        return true;
      }
    }
    // The bfloat16 pair kernels' dot product is VDPBF16PS; without it (Isa::kAvx512Vnni) the float32
    // kernels below take x's float32 copy.
    if (bf16_instructions()) {
      if (p.bits == 8) {
        for (int64_t r = 0; r < p.m; ++r) pair_activations8(p.x_bf16 + r * p.k_padded, p.k_padded, pairs + r * p.k_padded);
        *plan = plan_of<tile_bf16<1, 8, NibbleStep>, tile_bf16<2, 8, NibbleStep>, tile_bf16<3, 8, NibbleStep>,
                        tile_bf16<4, 8, NibbleStep>>(pairs);
        return true;
      }
      for (int64_t r = 0; r < p.m; ++r) pair_activations(p.x_bf16 + r * p.k_padded, p.k_padded, pairs + r * p.k_padded / 2);
      if (p.bits == 4)
        *plan = plan_of<tile_bf16<1, 4, NibbleStep>, tile_bf16<2, 4, NibbleStep>, tile_bf16<3, 4, NibbleStep>,
                        tile_bf16<4, 4, NibbleStep>>(pairs);
      else
        *plan = plan_of<tile6_bf16<1>, tile6_bf16<2>, tile6_bf16<3>, tile6_bf16<4>>(pairs);
      return true;
    }
  }
  if (p.bits == 4) {
    *plan = plan_of<tile_f32<1, 4>, tile_f32<2, 4>, tile_f32<3, 4>, tile_f32<4, 4>>(nullptr);
  } else if (p.bits == 8) {
    *plan = plan_of<tile_f32<1, 8>, tile_f32<2, 8>, tile_f32<3, 8>, tile_f32<4, 8>>(nullptr);
  } else {
    *plan = plan_of<tile6_f32<1>, tile6_f32<2>, tile6_f32<3>, tile6_f32<4>>(nullptr);
  }
  return true;
}

}  // namespace

bool tiled_gemv_avx512(const GemvProblem& p) { return run_tile_plan<plan_tiles>(p); }

bool tiled_gemv_avx512_batch(const GemvProblem* problems, int count, const TileEpilogue* after_tile) {
  return run_tile_plans<plan_tiles>(problems, count, after_tile);
}

}  // namespace detail
}  // namespace brecq

#pragma GCC pop_options
#else
namespace brecq {
namespace detail {
bool tiled_gemv_avx512(const GemvProblem&) { return false; }
bool tiled_gemv_avx512_batch(const GemvProblem*, int, const TileEpilogue*) { return false; }
bool dequantize_tiled_avx512(const uint8_t*, const uint16_t*, const uint8_t*, int64_t, int64_t, int, int64_t, void*,
                             bool, int) {
  return false;
}
}  // namespace detail
}  // namespace brecq
#endif
