// Dequantization steps shared by the AVX-512 kernels of both layouts (gemv_avx512.cpp, row-major;
// tiled_avx512.cpp, TILE16): include inside a "#pragma GCC target" region that enables AVX-512.
#pragma once
#include <cstdint>
#include <immintrin.h>

#include "gemv.h"

namespace brecq {
namespace detail {
namespace {  // internal linkage: each including unit compiles these for its own target options

// 32 4-bit codes in row-major nibble order (16 bytes; code 2j the low nibble of byte j) as float32
// codes 0..15 and 16..31.
BRECQ_ALWAYS_INLINE void nibbles_to_f32(__m128i bytes, __m512& first, __m512& second) {
  const __m128i nibble = _mm_set1_epi8(0x0f);
  const __m128i low = _mm_and_si128(bytes, nibble);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
  first = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(low, high)));
  second = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(low, high)));
}

// float32 to bfloat16 bits, rounded to nearest even with NaNs kept quiet, as numeric::f32_to_bf16:
// VCVTNEPS2BF16 where the CPU has it (`native`: Isa::kAvx512), else the same steps in integers.
BRECQ_ALWAYS_INLINE __m256i bf16_bits(__m512 v, bool native) {
  if (native) return (__m256i)_mm512_cvtneps_pbh(v);
  const __m512i x = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet));
}

// (q - z) * s of 32 consecutive codes (first: 0..15, second: 16..31) to dst, float32 or bfloat16
// bits (round to nearest even), writing only the first `left` of them: the portable loop's
// operations, so that the results are the same bit for bit.
BRECQ_ALWAYS_INLINE void store_dequantized(__m512 first, __m512 second, __m512 s, __m512 z, int64_t left, void* dst,
                                           bool out_bf16, bool native_bf16) {
  first = _mm512_mul_ps(_mm512_sub_ps(first, z), s);
  second = _mm512_mul_ps(_mm512_sub_ps(second, z), s);
  const __mmask16 m0 = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
  const __mmask16 m1 = left >= 32 ? static_cast<__mmask16>(0xffff)
                       : left > 16 ? static_cast<__mmask16>((1u << (left - 16)) - 1u) : static_cast<__mmask16>(0);
  if (out_bf16) {
    uint16_t* out = static_cast<uint16_t*>(dst);
    _mm256_mask_storeu_epi16(out, m0, bf16_bits(first, native_bf16));
    _mm256_mask_storeu_epi16(out + 16, m1, bf16_bits(second, native_bf16));
  } else {
    float* out = static_cast<float*>(dst);
    _mm512_mask_storeu_ps(out, m0, first);
    _mm512_mask_storeu_ps(out + 16, m1, second);
  }
}

}  // namespace
}  // namespace detail
}  // namespace brecq
