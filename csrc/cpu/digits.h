// bfloat16 activations as integer digits: the arrangement the integer TILE16 kernels of both ISAs
// (tiled_avx512.cpp, tiled_avx2.cpp) read, so that they multiply the same rounded activations
// (reference.digit_rounded_activations) and their int32 sums agree exactly.
//
// Each group of g activations of a row becomes integers m = x * 2^(14 - E), 2^E bounding the
// group's largest magnitude, so |m| < 2^14, split into signed bytes m = 256 hi + lo (hi in
// [-64, 64], lo in [-128, 127]). A bfloat16 within a factor 2^7 of the group's largest magnitude is
// exact (it has 8 significant bits); a smaller one is rounded to a multiple of 2^(E - 14), off by
// at most 2^(E - 15). The sums over a group are exact in int32 (|sum q m| < g qmax 2^14 < 2^31 for
// g <= digit_max_group), and meet scale * 2^(E - 14) once, in float32. The zero-point correction
// uses the sums of the rounded inputs, so the result is the product of the dequantized weights with
// the rounded activations, to float32 rounding.
//
// Included below a file's target pragma (AVX2 at least) and inside its anonymous namespace: each
// kernel file gets a copy compiled for its own ISA, so no AVX-512 code can be linked into the AVX2
// path. Written with AVX2 instructions only, so the copies compute the same digits.
#pragma once

constexpr int kDigitBits = 14;
constexpr int kDigitExponentRange = 100;  // 2^(14 - E) and 2^(E - 14) stay normal floats

// Largest group whose int32 sums of code x digit products cannot overflow: g qmax 2^14 < 2^31.
constexpr int64_t digit_max_group(int bits) { return bits == 4 ? 4096 : bits == 6 ? 1024 : bits == 8 ? 256 : 0; }

// 2^e for a normal float's exponent range, from its bits (std::ldexp is a library call).
inline float power_of_two(int e) {
  const uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
  float value;
  __builtin_memcpy(&value, &bits, 4);
  return value;
}

// Row x [k_padded] float32 (bfloat16 values) as the integers m above, per group: factor[grp] =
// 2^(E - 14) and sum[grp] the group's rounded inputs added up (exact for g <= 1024, whose integer
// sums stay below 2^24). Written to `out` at 16 bytes per 8 inputs, in one of two forms:
// - Words = false, digits: four dwords per 8 inputs, the high bytes, then the low bytes, of two code
//   vectors of a round of the kernels. 4 and 6 bits: x[8u + 0, 2, 4, 6] and x[8u + 1, 3, 5, 7] (a
//   lane's low and high nibbles); 8 bits: x[8u + 0..3] and x[8u + 4..7] (a lane of two consecutive
//   steps).
// - Words = true (8-bit codes on AVX2, which multiplies int16 words exactly): m itself as int16,
//   dwords (m0, m2), (m1, m3), (m4, m6), (m5, m7) of x[8u + 0..7], the pairs of codes a lane's even
//   and odd bytes hold in two consecutive steps.
// False when a group holds a non-finite value or a magnitude outside 2^+-100: the caller then runs
// the float kernel, which carries NaN and Inf as dense arithmetic does.
template <bool Words>
inline bool activation_integers(const float* x, int64_t k_padded, int64_t g, int bits, uint32_t* out, float* factor,
                                float* sum) {
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff), half = _mm256_set1_epi32(128);
  // Digits: the eight high then eight low bytes arrive as hi0-3 lo0-3 hi4-7 lo4-7 (saturating packs,
  // which never saturate here: both digits fit a signed byte). Words arrive as m0-7 (|m| < 2^14).
  // These shuffles put them in the order above.
  const __m128i order = Words       ? _mm_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15)
                        : bits != 8 ? _mm_setr_epi8(0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15)
                                    : _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
  for (int64_t grp = 0; grp < k_padded / g; ++grp) {
    const float* xg = x + grp * g;
    __m256i largest = _mm256_setzero_si256();  // float bits of |x| order as the magnitudes do
    for (int64_t i = 0; i < g; i += 8)
      largest = _mm256_max_epu32(largest,
                                 _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + i)), magnitude));
    __m128i l = _mm_max_epu32(_mm256_castsi256_si128(largest), _mm256_extracti128_si256(largest, 1));
    l = _mm_max_epu32(l, _mm_shuffle_epi32(l, 0x4e));
    l = _mm_max_epu32(l, _mm_shuffle_epi32(l, 0xb1));
    const uint32_t bits_of_largest = static_cast<uint32_t>(_mm_cvtsi128_si32(l));
    int exponent = 0;  // an all-zero group: any exponent
    if (bits_of_largest != 0) {
      exponent = static_cast<int>(bits_of_largest >> 23) - 126;  // 129 for Inf and NaN, -126 for subnormals
      if (exponent > kDigitExponentRange || exponent < -kDigitExponentRange) return false;
    }
    factor[grp] = power_of_two(exponent - kDigitBits);
    const __m256 to_integer = _mm256_set1_ps(power_of_two(kDigitBits - exponent));
    __m256i total = _mm256_setzero_si256();
    for (int64_t i = 0; i < g; i += 8) {
      const __m256i m = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + i), to_integer));  // nearest even
      total = _mm256_add_epi32(total, m);
      __m128i runs;
      if constexpr (Words) {
        const __m256i words = _mm256_packs_epi32(m, m);  // per 128-bit lane: m0-3 m0-3 | m4-7 m4-7
        runs = _mm_unpacklo_epi64(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
      } else {
        const __m256i hi = _mm256_srai_epi32(_mm256_add_epi32(m, half), 8);
        const __m256i lo = _mm256_sub_epi32(m, _mm256_slli_epi32(hi, 8));
        const __m256i words = _mm256_packs_epi32(hi, lo);  // per 128-bit lane: hi0-3 lo0-3 | hi4-7 lo4-7
        const __m256i bytes = _mm256_packs_epi16(words, words);
        runs = _mm_unpacklo_epi64(_mm256_castsi256_si128(bytes), _mm256_extracti128_si256(bytes, 1));
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (grp * g + i) / 2), _mm_shuffle_epi8(runs, order));
    }
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
    sum[grp] = static_cast<float>(_mm_cvtsi128_si32(t)) * factor[grp];
  }
  return true;
}

inline bool activation_digits(const float* x, int64_t k_padded, int64_t g, int bits, uint32_t* digits, float* factor,
                              float* sum) {
  return activation_integers<false>(x, k_padded, g, bits, digits, factor, sum);
}
inline bool activation_words(const float* x, int64_t k_padded, int64_t g, uint32_t* words, float* factor, float* sum) {
  return activation_integers<true>(x, k_padded, g, 8, words, factor, sum);
}
