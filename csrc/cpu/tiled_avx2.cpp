// AVX2 GEMV on TILE16 weights (format.h), 4, 6 and 8 bits, for CPUs without the AVX-512 kernels.
// Each 32-bit lane of a 64-byte step holds codes of one of a tile's 16 rows, so each 32-byte half
// of a step is eight rows: the AVX-512 arrangement carries over as two 8-lane vectors per step, and
// a tile's outputs still build up lane by lane with no horizontal sums.
//
// bfloat16 activations (the default): the same integer digits as the AVX-512 kernel (digits.h),
// hence the same int32 sums per group and the same float32 arithmetic after them: both ISAs give
// equal results. AVX2 has no VPDPBUSD; a lane's dot product of 4 code bytes with 4 digit bytes is
// VPMADDUBSW (byte pairs, into int16) and, every few rounds, VPMADDWD against the sum's weight (into
// int32). VPMADDUBSW saturates a pair above 32767: codes up to 63 against digits down to -128 stay
// within 2 * 63 * 128 = 16128, but 8-bit codes would not (2 * 255 * 128); they meet the activation
// integers as int16 words in VPMADDWD instead (tile_words).
// float32 activations, and bfloat16 ones the digits cannot hold (non-finite, or magnitudes outside
// 2^+-100): codes to float32 and a multiply-add with the broadcast activation, as on AVX-512, in the
// same order of sums.
#include <cstdint>
#include <immintrin.h>

#include "brecq/format.h"
#include "brecq/kernels.h"
#include "gemv.h"
#include "tile_plan.h"

#if defined(__x86_64__) && defined(BRECQ_HAVE_X86_DISPATCH)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace brecq {
namespace detail {
namespace {

#include "digits.h"

constexpr int64_t kPrefetchBytes = 4096;  // as tiled_avx512.cpp: codes requested ahead of use
constexpr int kHalfRows = 8;              // rows of a tile in one 8-lane vector

// A group's float32 scales for rows 8h..8h+7 of the tile, and scale * zero.
BRECQ_ALWAYS_INLINE __m256 half_scale(const GemvProblem& p, int64_t tile, int64_t grp, int half, __m256* scaled_zero) {
  const int64_t at = (tile * p.groups + grp) * kTileRows + kHalfRows * half;
  const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.scale + at)));
  const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.zero + at))));
  *scaled_zero = _mm256_mul_ps(s, z);
  return s;
}

// Codes of every row per round: 8 (one step of nibbles; at 8 bits two steps of 4 bytes a row).
// Bytes of a round, and where round t starts: rounds one after the other, or at 6 bits in pairs
// with their vector of top bits.
template <int Bits>
constexpr int64_t kRoundBytes = Bits == 8 ? 2 * kTileStepBytes : kTileStepBytes;
template <int Bits>
BRECQ_ALWAYS_INLINE const uint8_t* step_nibbles(const uint8_t* w, int64_t t) {
  if constexpr (Bits == 6) return w + (t / 2) * kTile6PairBytes + (t % 2) * kTileStepBytes;
  else return w + t * kRoundBytes<Bits>;
}

// Lane shifts by a signed count (a template argument: AVX2 shifts by an immediate).
template <int Left>
BRECQ_ALWAYS_INLINE __m256i shift_lanes(__m256i v) {
  if constexpr (Left > 0) return _mm256_slli_epi32(v, Left);
  else if constexpr (Left < 0) return _mm256_srli_epi32(v, -Left);
  else return v;
}

// The top two bits of code c of step P of a 6-bit pair sit at bit 2(4P + c % 4) + 16 (c / 4) of
// the row's lane of the pair's third vector (FORMAT.md). Odd = 0: codes 0, 2, 4, 6 (the low nibbles
// of bytes 0-3), Odd = 1: codes 1, 3, 5, 7; either way code 2b + Odd's top bits land on bits 4-5
// of byte b, beside its low nibble. Bytes 0 and 2 move by one count, bytes 1 and 3 by 4 more.
template <int P, int Odd>
BRECQ_ALWAYS_INLINE __m256i six_bit_tops(__m256i high) {
  constexpr int kFirst = 4 - 8 * P - 2 * Odd;  // byte 0: from bit 8P + 2 Odd to bit 4
  return _mm256_or_si256(_mm256_and_si256(shift_lanes<kFirst>(high), _mm256_set1_epi32(0x00300030)),
                         _mm256_and_si256(shift_lanes<kFirst + 4>(high), _mm256_set1_epi32(0x30003000)));
}

// Codes 8t + 0, 2, 4, 6 (first) and 8t + 1, 3, 5, 7 (second) of the eight rows of `half`, one
// byte each, in the order of the digits.
template <int Bits, int P>
BRECQ_ALWAYS_INLINE void code_bytes(const uint8_t* nibbles, const uint8_t* pair, int half, __m256i& first,
                                    __m256i& second) {
  const __m256i low_nibbles = _mm256_set1_epi32(0x0f0f0f0f);
  const __m256i lanes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(nibbles + 32 * half));
  first = _mm256_and_si256(lanes, low_nibbles);
  second = _mm256_and_si256(_mm256_srli_epi32(lanes, 4), low_nibbles);
  if constexpr (Bits == 6) {
    const __m256i high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair + 2 * kTileStepBytes + 32 * half));
    first = _mm256_or_si256(first, six_bit_tops<P, 0>(high));
    second = _mm256_or_si256(second, six_bit_tops<P, 1>(high));
  }
}

// int16 sums a round adds to (4 and 6 bits): code x high digit, weighing 256 in the group's sum,
// and code x low digit, weighing 1.
constexpr int kSums = 2;
constexpr int16_t kSumWeight[kSums] = {256, 1};

// One round: round t's codes of the halves against the digits of its 8 inputs, for MR rows of
// digits from `digits` on, added into the int16 sums.
template <int MR, int Bits, int FirstHalf, int Halves, int P>
BRECQ_ALWAYS_INLINE void digits_round(const uint8_t* w, int64_t t, const uint32_t* digits, int64_t digit_row,
                                      __m256i (&sums)[MR][Halves][kSums]) {
  const uint8_t* at = step_nibbles<Bits>(w, t);
  __m256i first[Halves], second[Halves];  // the code vectors meeting digit dwords 0/2 and 1/3
  for (int h = 0; h < Halves; ++h) code_bytes<Bits, P>(at, at - P * kTileStepBytes, FirstHalf + h, first[h], second[h]);
  for (int r = 0; r < MR; ++r) {
    const uint32_t* d = digits + r * digit_row + 4 * t;
    const __m256i d0 = _mm256_set1_epi32(static_cast<int>(d[0])), d1 = _mm256_set1_epi32(static_cast<int>(d[1]));
    const __m256i d2 = _mm256_set1_epi32(static_cast<int>(d[2])), d3 = _mm256_set1_epi32(static_cast<int>(d[3]));
    for (int h = 0; h < Halves; ++h) {
      sums[r][h][0] = _mm256_add_epi16(sums[r][h][0], _mm256_add_epi16(_mm256_maddubs_epi16(first[h], d0),
                                                                       _mm256_maddubs_epi16(second[h], d1)));
      sums[r][h][1] = _mm256_add_epi16(sums[r][h][1], _mm256_add_epi16(_mm256_maddubs_epi16(first[h], d2),
                                                                       _mm256_maddubs_epi16(second[h], d3)));
    }
  }
}

// int16 sums First..Last - 1 into the group's int32 sum of code x activation-integer products.
template <int First, int Last, int MR, int Halves>
BRECQ_ALWAYS_INLINE void widen_sums(__m256i (&total)[MR][Halves], __m256i (&sums)[MR][Halves][kSums]) {
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < Halves; ++h)
      for (int i = First; i < Last; ++i) {
        total[r][h] = _mm256_add_epi32(total[r][h],
                                       _mm256_madd_epi16(sums[r][h][i], _mm256_set1_epi16(kSumWeight[i])));
        sums[r][h][i] = _mm256_setzero_si256();
      }
}

// The end of a group for the integer kernels: its exact int32 sums meet scale * 2^(E - 14) once,
// and the zero-point correction takes the group's rounded activations (digits.h).
template <int MR, int FirstHalf, int Halves>
BRECQ_ALWAYS_INLINE void close_integer_group(const GemvProblem& p, int64_t tile, int64_t grp, int64_t r0,
                                             const __m256i (&sum)[MR][Halves], const float* factor,
                                             const float* rounded_sum, __m256 (&total)[MR][Halves],
                                             __m256 (&correction)[MR][Halves]) {
  for (int h = 0; h < Halves; ++h) {
    __m256 scaled_zero;
    const __m256 s = half_scale(p, tile, grp, FirstHalf + h, &scaled_zero);
    for (int r = 0; r < MR; ++r) {
      total[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r][h]),
                                    _mm256_mul_ps(s, _mm256_set1_ps(factor[(r0 + r) * p.groups + grp])), total[r][h]);
      correction[r][h] = _mm256_fmadd_ps(scaled_zero, _mm256_set1_ps(rounded_sum[(r0 + r) * p.groups + grp]),
                                         correction[r][h]);
    }
  }
}

// Halves (1 or 2) vectors of eight rows from half FirstHalf on, against MR rows of digits
// (activation_digits; the m rows of factors and then of sums follow the m rows of digits).
// out[r][h] = rows 8 (FirstHalf + h) .. + 7 of the tile for activation row r0 + r, before bias.
// The int16 sums take as many rounds as cannot overflow them (the bounds from digits.h: high
// digits in [-64, 64], low in [-128, 127]): at 4 bits a round adds at most 2 * 2 * 15 * 64 = 3840
// to a high-digit sum and 7680 to a low-digit one, so four rounds fit; at 6 bits 16128 and 32256,
// so a pair of rounds for the high-digit sums and one round for the low.
template <int MR, int Bits, int FirstHalf, int Halves>
void tile_digits(const GemvProblem& p, const uint32_t* digits, int64_t r0, int64_t tile, __m256 (*out)[2]) {
  static_assert(Bits == 4 || Bits == 6, "8-bit codes take tile_words");
  constexpr int64_t kRoundsPerWiden = Bits == 6 ? 2 : 4;  // a 6-bit pair of steps shares its top bits
  const int64_t steps_per_group = p.g / kTileStepCodes, digit_row = p.k_padded / 2;
  const float* factor = reinterpret_cast<const float*>(digits + p.m * digit_row);
  const float* rounded_sum = factor + p.m * p.groups;
  const uint32_t* pass_digits = digits + r0 * digit_row;
  const uint8_t* w = p.packed + tile * tile_code_bytes(p.k, p.g, Bits);
  __m256 total[MR][Halves], correction[MR][Halves];
  __m256i int16_sums[MR][Halves][kSums];
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < Halves; ++h) {
      total[r][h] = correction[r][h] = _mm256_setzero_ps();
      for (int i = 0; i < kSums; ++i) int16_sums[r][h][i] = _mm256_setzero_si256();
    }
  for (int64_t grp = 0; grp < p.groups; ++grp) {
    prefetch_group_params(p, tile * p.groups + grp + kParamsAheadGroups);
    __m256i sum[MR][Halves];
    for (int r = 0; r < MR; ++r)
      for (int h = 0; h < Halves; ++h) sum[r][h] = _mm256_setzero_si256();
    const int64_t end = grp * steps_per_group + steps_per_group;
    for (int64_t t0 = grp * steps_per_group; t0 < end; t0 += kRoundsPerWiden) {
      const uint8_t* load = step_nibbles<Bits>(w, t0);
      if constexpr (Bits == 6) {
        for (int64_t line = 0; line < kTile6PairBytes; line += 64) __builtin_prefetch(load + kPrefetchBytes + line, 0, 3);
        digits_round<MR, Bits, FirstHalf, Halves, 0>(w, t0, pass_digits, digit_row, int16_sums);
        widen_sums<1, 2>(sum, int16_sums);
        digits_round<MR, Bits, FirstHalf, Halves, 1>(w, t0 + 1, pass_digits, digit_row, int16_sums);
      } else if (t0 + kRoundsPerWiden <= end) {  // written out: a loop of unknown count kept a round an iteration
        for (int64_t line = 0; line < kRoundsPerWiden * kRoundBytes<Bits>; line += 64)
          __builtin_prefetch(load + kPrefetchBytes + line, 0, 3);
        digits_round<MR, Bits, FirstHalf, Halves, 0>(w, t0, pass_digits, digit_row, int16_sums);
        digits_round<MR, Bits, FirstHalf, Halves, 0>(w, t0 + 1, pass_digits, digit_row, int16_sums);
        digits_round<MR, Bits, FirstHalf, Halves, 0>(w, t0 + 2, pass_digits, digit_row, int16_sums);
        digits_round<MR, Bits, FirstHalf, Halves, 0>(w, t0 + 3, pass_digits, digit_row, int16_sums);
      } else {
        for (int64_t t = t0; t < end; ++t) {
          for (int64_t line = 0; line < kRoundBytes<Bits>; line += 64)
            __builtin_prefetch(step_nibbles<Bits>(w, t) + kPrefetchBytes + line, 0, 3);
          digits_round<MR, Bits, FirstHalf, Halves, 0>(w, t, pass_digits, digit_row, int16_sums);
        }
      }
      widen_sums<0, kSums>(sum, int16_sums);
    }
    close_integer_group<MR, FirstHalf, Halves>(p, tile, grp, r0, sum, factor, rounded_sum, total, correction);
  }
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < Halves; ++h) out[r][FirstHalf + h] = _mm256_sub_ps(total[r][h], correction[r][h]);
}

// 8-bit codes against the activation integers m as int16 words (activation_words): VPMADDUBSW on
// whole 8-bit codes against low digits down to -128 would saturate its int16 pairs (2 * 255 * 128),
// but VPMADDWD multiplies a lane's codes 0 and 2 (and 1 and 3), masked out as words, with the words
// (m0, m2) (and (m1, m3)) exactly into int32. Per round of 8 codes a row: 6 decoding ops and 4
// VPMADDWD, against 8 VPMADDUBSW and as many adds had the codes gone as nibbles against the
// digits. |sum q m| < g * 255 * 2^14 < 2^31 for g <= digit_max_group(8), as in the digit kernels;
// the sums are the same integers, so the result equals the AVX-512 kernel's.
template <int MR, int FirstHalf, int Halves>
void tile_words(const GemvProblem& p, const uint32_t* words, int64_t r0, int64_t tile, __m256 (*out)[2]) {
  const int64_t rounds_per_group = p.g / kTileStepCodes, word_row = p.k_padded / 2;
  const float* factor = reinterpret_cast<const float*>(words + p.m * word_row);
  const float* rounded_sum = factor + p.m * p.groups;
  const uint8_t* w = p.packed + tile * tile_code_bytes(p.k, p.g, 8);
  const __m256i even_bytes = _mm256_set1_epi32(0x00ff00ff);
  __m256 total[MR][Halves], correction[MR][Halves];
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < Halves; ++h) total[r][h] = correction[r][h] = _mm256_setzero_ps();
  for (int64_t grp = 0; grp < p.groups; ++grp) {
    prefetch_group_params(p, tile * p.groups + grp + kParamsAheadGroups);
    __m256i sum[MR][Halves];
    for (int r = 0; r < MR; ++r)
      for (int h = 0; h < Halves; ++h) sum[r][h] = _mm256_setzero_si256();
    for (int64_t t = grp * rounds_per_group; t < grp * rounds_per_group + rounds_per_group; ++t) {
      const uint8_t* at = w + t * kRoundBytes<8>;  // codes 8t..8t+3, then 8t+4..8t+7 a row
      __m256i pairs[Halves][4];  // codes (0, 2), (1, 3), (4, 6), (5, 7) of each row, as words
      for (int h = 0; h < Halves; ++h) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + 32 * (FirstHalf + h)));
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + kTileStepBytes + 32 * (FirstHalf + h)));
        pairs[h][0] = _mm256_and_si256(a, even_bytes);
        pairs[h][1] = _mm256_and_si256(_mm256_srli_epi32(a, 8), even_bytes);
        pairs[h][2] = _mm256_and_si256(b, even_bytes);
        pairs[h][3] = _mm256_and_si256(_mm256_srli_epi32(b, 8), even_bytes);
      }
      for (int r = 0; r < MR; ++r) {
        const uint32_t* m = words + (r0 + r) * word_row + 4 * t;
        for (int j = 0; j < 4; ++j) {
          const __m256i mj = _mm256_set1_epi32(static_cast<int>(m[j]));
          for (int h = 0; h < Halves; ++h) sum[r][h] = _mm256_add_epi32(sum[r][h], _mm256_madd_epi16(pairs[h][j], mj));
        }
      }
    }
    close_integer_group<MR, FirstHalf, Halves>(p, tile, grp, r0, sum, factor, rounded_sum, total, correction);
  }
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < Halves; ++h) out[r][FirstHalf + h] = _mm256_sub_ps(total[r][h], correction[r][h]);
}

// Code C (0-7) of step P of the eight rows of a half, as float32.
// At 8 bits, codes 0-3 are the bytes of `lanes` and codes 4-7 those of `high` (the round's second step).
template <int Bits, int P, int C>
BRECQ_ALWAYS_INLINE __m256 code_f32(__m256i lanes, __m256i high) {
  if constexpr (Bits == 8)
    return _mm256_cvtepi32_ps(_mm256_and_si256(shift_lanes<-8 * (C % 4)>(C < 4 ? lanes : high), _mm256_set1_epi32(0xff)));
  const __m256i low = _mm256_and_si256(shift_lanes<-4 * C>(lanes), _mm256_set1_epi32(0xf));
  if constexpr (Bits == 4) {
    return _mm256_cvtepi32_ps(low);
  } else {
    constexpr int kTop = 2 * (4 * P + C % 4) + 16 * (C / 4);
    const __m256i top = _mm256_and_si256(shift_lanes<4 - kTop>(high), _mm256_set1_epi32(0x30));
    return _mm256_cvtepi32_ps(_mm256_or_si256(low, top));
  }
}

template <int Bits, int P, int C, int MR, int Halves>
BRECQ_ALWAYS_INLINE void f32_codes(const GemvProblem& p, int64_t r0, int64_t at, const __m256i (&lanes)[Halves],
                                   const __m256i (&high)[Halves], __m256 (&acc)[MR][Halves][2]) {
  for (int h = 0; h < Halves; ++h) {
    const __m256 q = code_f32<Bits, P, C>(lanes[h], high[h]);
    for (int r = 0; r < MR; ++r)
      acc[r][h][C % 2] = _mm256_fmadd_ps(q, _mm256_set1_ps(p.x[(r0 + r) * p.k_padded + at + C]), acc[r][h][C % 2]);
  }
  if constexpr (C + 1 < kTileStepCodes) f32_codes<Bits, P, C + 1, MR, Halves>(p, r0, at, lanes, high, acc);
}

template <int MR, int Bits, int FirstHalf, int Halves, int P>
BRECQ_ALWAYS_INLINE void f32_round(const GemvProblem& p, const uint8_t* w, int64_t t, int64_t r0,
                                   __m256 (&acc)[MR][Halves][2]) {
  const uint8_t* nibbles = step_nibbles<Bits>(w, t);
  __m256i lanes[Halves], high[Halves];
  for (int h = 0; h < Halves; ++h) {
    lanes[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(nibbles + 32 * (FirstHalf + h)));
    if constexpr (Bits == 6)  // the pair's top bits
      high[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(nibbles - P * kTileStepBytes + 2 * kTileStepBytes +
                                                                     32 * (FirstHalf + h)));
    else if constexpr (Bits == 8)  // the round's second step
      high[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(nibbles + kTileStepBytes + 32 * (FirstHalf + h)));
    else
      high[h] = lanes[h];
  }
  f32_codes<Bits, P, 0, MR, Halves>(p, r0, kTileStepCodes * t, lanes, high, acc);
}

// The same tile through float32 activations (p.x), in the AVX-512 float kernel's order of sums.
template <int MR, int Bits, int FirstHalf, int Halves>
void tile_f32(const GemvProblem& p, const uint32_t*, int64_t r0, int64_t tile, __m256 (*out)[2]) {
  constexpr int kStepsPerLoad = Bits == 6 ? 2 : 1;
  const int64_t steps_per_group = p.g / kTileStepCodes;
  const uint8_t* w = p.packed + tile * tile_code_bytes(p.k, p.g, Bits);
  __m256 total[MR][Halves], correction[MR][Halves];
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < Halves; ++h) total[r][h] = correction[r][h] = _mm256_setzero_ps();
  for (int64_t grp = 0; grp < p.groups; ++grp) {
    prefetch_group_params(p, tile * p.groups + grp + kParamsAheadGroups);
    __m256 acc[MR][Halves][2];
    for (int r = 0; r < MR; ++r)
      for (int h = 0; h < Halves; ++h) acc[r][h][0] = acc[r][h][1] = _mm256_setzero_ps();
    for (int64_t t = grp * steps_per_group; t < grp * steps_per_group + steps_per_group; t += kStepsPerLoad) {
      const uint8_t* load = step_nibbles<Bits>(w, t);
      for (int64_t line = 0; line < (Bits == 6 ? kTile6PairBytes : kRoundBytes<Bits>); line += 64)
        __builtin_prefetch(load + kPrefetchBytes + line, 0, 3);
      f32_round<MR, Bits, FirstHalf, Halves, 0>(p, w, t, r0, acc);
      if constexpr (Bits == 6) f32_round<MR, Bits, FirstHalf, Halves, 1>(p, w, t + 1, r0, acc);
    }
    for (int h = 0; h < Halves; ++h) {
      __m256 scaled_zero;
      const __m256 s = half_scale(p, tile, grp, FirstHalf + h, &scaled_zero);
      for (int r = 0; r < MR; ++r) {
        total[r][h] = _mm256_fmadd_ps(_mm256_add_ps(acc[r][h][0], acc[r][h][1]), s, total[r][h]);
        correction[r][h] = _mm256_fmadd_ps(scaled_zero, _mm256_set1_ps(p.xsum[(r0 + r) * p.groups + grp]),
                                           correction[r][h]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < Halves; ++h) out[r][FirstHalf + h] = _mm256_sub_ps(total[r][h], correction[r][h]);
}

using HalfTileFn = void (*)(const GemvProblem&, const uint32_t*, int64_t, int64_t, __m256 (*)[2]);

template <int MR, int Bits, int FirstHalf, int Halves>
struct IntegerKernel {  // bfloat16 activations as integers: digits at 4 and 6 bits, words at 8
  static constexpr HalfTileFn fn = tile_digits<MR, Bits, FirstHalf, Halves>;
};
template <int MR, int FirstHalf, int Halves>
struct IntegerKernel<MR, 8, FirstHalf, Halves> {
  static constexpr HalfTileFn fn = tile_words<MR, FirstHalf, Halves>;
};
template <int MR, int Bits, int FirstHalf, int Halves>
struct FloatKernel {
  static constexpr HalfTileFn fn = tile_f32<MR, Bits, FirstHalf, Halves>;
};

// Up to two activation rows of a pass take both halves of a tile in one loop (the activations'
// broadcasts serve both); with more rows, each half has a loop of its own so that the accumulators
// stay in the 16 registers.
template <template <int, int, int, int> class Kernel, int MR, int Bits>
BRECQ_ALWAYS_INLINE void run_pass(const GemvProblem& p, const uint32_t* activations, int64_t r0, int64_t tile,
                                  __m256 (*out)[2]) {
  if constexpr (MR <= 2) {
    Kernel<MR, Bits, 0, 2>::fn(p, activations, r0, tile, out);
  } else {
    Kernel<MR, Bits, 0, 1>::fn(p, activations, r0, tile, out);
    Kernel<MR, Bits, 1, 1>::fn(p, activations, r0, tile, out);
  }
}

// One tile's outputs for every activation row.
template <template <int, int, int, int> class Kernel, int Bits>
void run_tile(const GemvProblem& p, const uint32_t* activations, int64_t tile) {
  prefetch_first_group_params(p, tile);
  const int64_t rows_here = p.n - tile * kTileRows < kTileRows ? p.n - tile * kTileRows : kTileRows;
  for (int64_t r0 = 0; r0 < p.m; r0 += kRowsPerPass) {
    const int64_t pass = p.m - r0 >= kRowsPerPass ? kRowsPerPass : p.m - r0;
    __m256 out[kRowsPerPass][2];
    switch (pass) {
      case 1: run_pass<Kernel, 1, Bits>(p, activations, r0, tile, out); break;
      case 2: run_pass<Kernel, 2, Bits>(p, activations, r0, tile, out); break;
      case 3: run_pass<Kernel, 3, Bits>(p, activations, r0, tile, out); break;
      default: run_pass<Kernel, 4, Bits>(p, activations, r0, tile, out); break;
    }
    for (int64_t r = 0; r < pass; ++r)
      for (int h = 0; h < 2; ++h) {
        const int64_t first_row = tile * kTileRows + kHalfRows * h, rows = rows_here - kHalfRows * h;
        if (rows <= 0) break;
        __m256 y = out[r][h];
        if (p.bias) {
          alignas(32) float bias[kHalfRows] = {0, 0, 0, 0, 0, 0, 0, 0};
          for (int64_t i = 0; i < (rows < kHalfRows ? rows : kHalfRows); ++i) bias[i] = p.bias[first_row + i];
          y = _mm256_add_ps(y, _mm256_load_ps(bias));
        }
        const int64_t at = (r0 + r) * p.n + first_row;
        if (!p.y_bf16 && rows >= kHalfRows) {
          _mm256_storeu_ps(p.y + at, y);
        } else {
          alignas(32) float values[kHalfRows];
          _mm256_store_ps(values, y);
          for (int64_t i = 0; i < (rows < kHalfRows ? rows : kHalfRows); ++i) p.store(at + i, values[i]);
        }
      }
  }
}

template <template <int, int, int, int> class Kernel>
TileRunFn tile_runner(int bits) {
  return bits == 4 ? run_tile<Kernel, 4> : bits == 6 ? run_tile<Kernel, 6> : run_tile<Kernel, 8>;
}

// Prepares p's digits in p.scratch when it takes them and picks its kernel; false for a width or
// group size these kernels do not hold.
bool plan_tiles(const GemvProblem& p, TilePlan* plan) {
  static_assert(kRowsPerPass == 4, "tile dispatch handles up to 4 rows per pass");
  if (!tile16_supports(p.bits, p.g)) return false;
  if (p.x_bf16 && p.g <= digit_max_group(p.bits)) {
    uint32_t* digits = reinterpret_cast<uint32_t*>(p.scratch);  // m * k_padded / 2 dwords, then factors and sums
    float* factor = reinterpret_cast<float*>(digits + p.m * p.k_padded / 2);
    float* rounded_sum = factor + p.m * p.groups;
    bool representable = true;
    for (int64_t r = 0; r < p.m && representable; ++r)
      representable =
          p.bits == 8 ? activation_words(p.x + r * p.k_padded, p.k_padded, p.g, digits + r * p.k_padded / 2,
                                         factor + r * p.groups, rounded_sum + r * p.groups)
                      : activation_digits(p.x + r * p.k_padded, p.k_padded, p.g, p.bits, digits + r * p.k_padded / 2,
                                          factor + r * p.groups, rounded_sum + r * p.groups);
    if (representable) {
      plan->run = tile_runner<IntegerKernel>(p.bits);
      plan->activations = digits;
      return true;
    }
  }
  plan->run = tile_runner<FloatKernel>(p.bits);
  plan->activations = nullptr;
  return true;
}

// ---- dequantization into dense rows (the GEMM path's workspace) -----------------------------
// Row by row within a tile (the tile's codes stay in L1): a row's 8 codes of a step come from its
// one 32-bit lane (and at 6 bits its lane of top bits) by variable shifts, and are stored as the
// portable loop computes them, (q - z) * s, so values equal the row-major ones bit for bit.
template <int Bits>
void dequantize_tiles(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, int64_t n, int64_t k,
                      int64_t g, void* out, bool out_bf16, int threads) {
  const int64_t tile_bytes = tile_code_bytes(k, g, Bits), groups = num_groups(k, g);
  const int64_t steps = (k + kTileStepCodes - 1) / kTileStepCodes;
  const __m256i nibble_shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), low4 = _mm256_set1_epi32(0xf);
  // Top bits of code c of step P at 2 (4P + c % 4) + 16 (c / 4) (FORMAT.md).
  const __m256i top_shifts[2] = {_mm256_setr_epi32(0, 2, 4, 6, 16, 18, 20, 22),
                                 _mm256_setr_epi32(8, 10, 12, 14, 24, 26, 28, 30)};
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t tile = 0; tile < tile_count(n); ++tile) {
    const uint8_t* w = codes + tile * tile_bytes;
    const int64_t rows_here = n - tile * kTileRows < kTileRows ? n - tile * kTileRows : kTileRows;
    for (int64_t lane = 0; lane < rows_here; ++lane) {
      const int64_t row = tile * kTileRows + lane;
      for (int64_t t = 0; t < steps; ++t) {
        const int64_t at = (tile * groups + kTileStepCodes * t / g) * kTileRows + lane;
        uint32_t word;
        __m256i q;
        if constexpr (Bits == 8) {  // codes 8t..8t+3 in unit 2t, 8t+4..8t+7 in unit 2t+1
          uint32_t second;
          __builtin_memcpy(&word, w + 2 * t * kTileStepBytes + 4 * lane, 4);
          __builtin_memcpy(&second, w + (2 * t + 1) * kTileStepBytes + 4 * lane, 4);
          q = _mm256_cvtepu8_epi32(_mm_setr_epi32(static_cast<int>(word), static_cast<int>(second), 0, 0));
        } else if constexpr (Bits == 4) {
          __builtin_memcpy(&word, w + t * kTileStepBytes + 4 * lane, 4);
          q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), nibble_shifts), low4);
        } else {
          const uint8_t* pair = w + (t / 2) * kTile6PairBytes;
          uint32_t high;
          __builtin_memcpy(&word, pair + (t % 2) * kTileStepBytes + 4 * lane, 4);
          __builtin_memcpy(&high, pair + 2 * kTileStepBytes + 4 * lane, 4);
          const __m256i low = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), nibble_shifts), low4);
          const __m256i top = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(high)), top_shifts[t % 2]),
                                               _mm256_set1_epi32(3));
          q = _mm256_or_si256(low, _mm256_slli_epi32(top, 4));
        }
        const __m256 s = _mm256_set1_ps(_cvtsh_ss(scale[at])), z = _mm256_set1_ps(static_cast<float>(zero[at]));
        const __m256 value = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), z), s);
        const int64_t c0 = kTileStepCodes * t, left = k - c0 < kTileStepCodes ? k - c0 : kTileStepCodes;
        if (out_bf16) {  // round to nearest even, as numeric::f32_to_bf16 (the values are finite)
          const __m256i bits = _mm256_castps_si256(value);
          const __m256i rounded = _mm256_srli_epi32(
              _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)),
                               _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1))), 16);
          const __m128i halves = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
          uint16_t* dst = static_cast<uint16_t*>(out) + row * k + c0;
          if (left == kTileStepCodes) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), halves);
          else {
            alignas(16) uint16_t staged[kTileStepCodes];
            _mm_store_si128(reinterpret_cast<__m128i*>(staged), halves);
            for (int64_t i = 0; i < left; ++i) dst[i] = staged[i];
          }
        } else {
          float* dst = static_cast<float*>(out) + row * k + c0;
          if (left == kTileStepCodes) _mm256_storeu_ps(dst, value);
          else {
            alignas(32) float staged[kTileStepCodes];
            _mm256_store_ps(staged, value);
            for (int64_t i = 0; i < left; ++i) dst[i] = staged[i];
          }
        }
      }
    }
  }
}

}  // namespace

bool dequantize_tiled_avx2(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, int64_t n, int64_t k,
                           int bits, int64_t g, void* out, bool out_bf16, int threads) {
  if (!tile16_supports(bits, g)) return false;
  if (bits == 4) dequantize_tiles<4>(codes, scale, zero, n, k, g, out, out_bf16, threads);
  else if (bits == 6) dequantize_tiles<6>(codes, scale, zero, n, k, g, out, out_bf16, threads);
  else dequantize_tiles<8>(codes, scale, zero, n, k, g, out, out_bf16, threads);
  return true;
}

bool tiled_gemv_avx2(const GemvProblem& p) { return run_tile_plan<plan_tiles>(p); }

bool tiled_gemv_avx2_batch(const GemvProblem* problems, int count, const TileEpilogue* after_tile) {
  return run_tile_plans<plan_tiles>(problems, count, after_tile);
}

}  // namespace detail
}  // namespace brecq

#pragma GCC pop_options
#else
namespace brecq {
namespace detail {
bool tiled_gemv_avx2(const GemvProblem&) { return false; }
bool tiled_gemv_avx2_batch(const GemvProblem*, int, const TileEpilogue*) { return false; }
bool dequantize_tiled_avx2(const uint8_t*, const uint16_t*, const uint8_t*, int64_t, int64_t, int, int64_t, void*, bool,
                           int) {
  return false;
}
}  // namespace detail
}  // namespace brecq
#endif
