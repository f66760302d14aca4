// AVX-512 GEMV for packed weights of every width, 2 to 8 bits (needs AVX512F/BW/VL/VBMI/BF16; chosen at run
// time). 4, 6 and 8 bits have decoders of their own; 2, 3, 5 and 7 bits share one (BitStream below).
//
// Activations are rearranged once per call so that the order in which codes come out of the
// packed bytes needs no shuffling of the weights: the dot product does not care about order.
// bfloat16 activations use VDPBF16PS on codes turned into bfloat16 by bit tricks: 0x4300 | q is
// exactly the bfloat16 of 128 + q for q < 128, so sum(x * (128 + q)) - 128 * sum(x) = sum(x * q).
//
// Only this translation unit is compiled for AVX-512 (pragma below); it uses no standard-library
// templates so that no AVX-512 instantiation can leak into code shared with other units.
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "brecq/format.h"
#include "gemv.h"

#if defined(__x86_64__) && defined(BRECQ_HAVE_X86_DISPATCH)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16,avx2,fma,f16c,bmi2")
#include "dequant_avx512.h"

namespace brecq {
namespace detail {
namespace {

constexpr int kChunkF32 = 32;   // codes per inner step, float32 path
constexpr int kChunkBf16 = 64;  // codes per inner step, bfloat16 path
constexpr int kBlock4 = 128;    // codes per inner step, 4-bit bfloat16 path (64 bytes, one load)
// Weight bytes requested ahead of use (hides DRAM latency), rounded up to whole rows. Against
// 2 KiB in bench/ab_gemv.sh (1 row, 2 threads, three Qwen3 shapes): 12 KiB, the former eight rows
// of a 3072-input layer, was 2-8 % slower; 1 and 4 KiB were within 3 %.
constexpr int64_t kPrefetchBytes = 2048;

// 6-bit decoding into 16-bit lanes, lane i = code i of a run of 32 codes (24 bytes):
// vpermb copies the 3 bytes of unit q (codes 4q..4q+3) into the low bytes of 64-bit lane q, then
// vpmultishiftqb pulls the byte starting at bit 6j of that lane into the low byte of word j.
// The high byte and the top 2 bits of each word are junk, cleared by the caller's mask.
inline __m512i six_bit_gather(int byte_offset) {
  alignas(64) uint8_t idx[64];
  for (int q = 0; q < 8; ++q)
    for (int j = 0; j < 8; ++j) idx[8 * q + j] = static_cast<uint8_t>(byte_offset + 3 * q + (j < 3 ? j : 0));
  return _mm512_load_si512(idx);
}
inline __m512i six_bit_shifts() {
  alignas(64) uint8_t ctrl[64];
  for (int q = 0; q < 8; ++q)
    for (int j = 0; j < 8; ++j) ctrl[8 * q + j] = static_cast<uint8_t>(j % 2 == 0 ? 6 * (j / 2) : 0);
  return _mm512_load_si512(ctrl);
}
inline __m512i six_bit_decode(__m512i raw, __m512i gather, __m512i shifts) {
  return _mm512_multishift_epi64_epi8(shifts, _mm512_permutexvar_epi8(gather, raw));
}

// Any width below 8 bits: eight consecutive codes are exactly Bits bytes of the row's bit stream
// (format.h), so unit u of a run (codes 8u..8u+7) is bytes Bits*u .. Bits*u + Bits - 1. vpermb copies
// unit u into the low bytes of 64-bit lane u and vpmultishiftqb pulls the byte starting at bit
// Bits*j of that lane into byte j (the shifts stay below 64 - 8 for Bits <= 7): byte 8u + j is
// then code 8u + j with junk above its low Bits bits, which the caller masks off. Natural order.
template <int Bits>
inline __m512i bit_stream_gather() {
  alignas(64) uint8_t idx[64];
  for (int u = 0; u < 8; ++u)
    for (int j = 0; j < 8; ++j) idx[8 * u + j] = static_cast<uint8_t>(j < Bits ? Bits * u + j : 0);
  return _mm512_load_si512(idx);
}
template <int Bits>
inline __m512i bit_stream_shifts() {
  alignas(64) uint8_t ctrl[64];
  for (int u = 0; u < 8; ++u)
    for (int j = 0; j < 8; ++j) ctrl[8 * u + j] = static_cast<uint8_t>(Bits * j);
  return _mm512_load_si512(ctrl);
}

// ---- arrangement of activations per (bits, path) --------------------------------------------
// 4-bit: inside every chunk of C codes, the even positions first, then the odd ones (low and high
// nibbles of consecutive bytes). 6-bit: natural order.
void arrange_even_odd_f32(const float* x, int64_t len, int chunk, float* out) {
  for (int64_t c = 0; c < len; c += chunk)
    for (int i = 0; i < chunk / 2; ++i) {
      out[c + i] = x[c + 2 * i];
      out[c + chunk / 2 + i] = x[c + 2 * i + 1];
    }
}
void arrange_even_odd_bf16(const uint16_t* x, int64_t len, int chunk, uint16_t* out) {
  for (int64_t c = 0; c < len; c += chunk)
    for (int i = 0; i < chunk / 2; ++i) {
      out[c + i] = x[c + 2 * i];
      out[c + chunk / 2 + i] = x[c + 2 * i + 1];
    }
}

// 4-bit, bfloat16, blocks of 128 codes: the 16-bit word i of a block's 64 bytes holds codes
// 4i..4i+3 (one per nibble), so the block decodes into four vectors, vector s holding codes 4i + s.
void arrange_by_nibble_bf16(const uint16_t* x, int64_t len, uint16_t* out) {
  for (int64_t b = 0; b < len; b += kBlock4)
    for (int s = 0; s < 4; ++s)
      for (int i = 0; i < 32; ++i) out[b + 32 * s + i] = x[b + 4 * i + s];
}

// Largest number of groups per row the fast kernels handle (their per-row scale table lives on
// the stack); wider rows go to the portable kernel.
constexpr int64_t kMaxGroups = 4096;

// Zero-point correction: for each activation row r, sum_g scale_g * (zero_g + offset) * xsum[r][g],
// kept as a vector over groups and left unreduced: the row's result is one horizontal sum of
// (total - correction), where two sums cost a row's share of the FP pipes that the dot products
// need (measured with brecq_gemv_bench).
//
// group_scales: the float32 scales of a weight row's groups g0..g0+15 (zero past the row; scale_row
// and zero_row point at the row's first group), adding those groups' share to correction[0..MR).
template <int MR>
inline __m512 group_scales(const GemvProblem& p, const uint16_t* scale_row, const uint8_t* zero_row, int64_t g0,
                           int64_t r0, __m512 offset, __m512* correction) {
  const int64_t left = p.groups - g0;
  const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
  const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, scale_row + g0));
  const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, zero_row + g0)));
  const __m512 sz = _mm512_mul_ps(s, _mm512_add_ps(z, offset));
  for (int r = 0; r < MR; ++r)
    correction[r] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(mask, p.xsum + (r0 + r) * p.groups + g0),
                                    correction[r]);
  return s;
}

// The whole row's scales into a table (for kernels that index it per group), and its correction.
template <int MR>
inline void row_prologue(const GemvProblem& p, int64_t row, int64_t r0, float offset, float* scales,
                         __m512* correction) {
  for (int r = 0; r < MR; ++r) correction[r] = _mm512_setzero_ps();
  const __m512 off = _mm512_set1_ps(offset);
  const uint16_t* scale_row = p.scale + row * p.groups;
  const uint8_t* zero_row = p.zero + row * p.groups;
  for (int64_t g0 = 0; g0 < p.groups; g0 += 16)
    _mm512_storeu_ps(scales + g0, group_scales<MR>(p, scale_row, zero_row, g0, r0, off, correction));
}

// ---- code decoders: per-row constants, then one call per chunk of codes ----------------------
// Float32 path: a chunk of 32 codes as two vectors of 16 floats, in the order of the arranged x.
// Constructors are written out: GCC compiles implicit ones without the target pragma.
struct FourBitF32 {
  __m512i low_nibble;
  FourBitF32() : low_nibble(_mm512_set1_epi32(0x0f)) {}
  void operator()(const uint8_t* w, int64_t c, __m512& first, __m512& second) const {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c / 2)));
    first = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, low_nibble));
    second = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
  }
};
struct SixBitF32 {
  __m512i gather, shifts, mask6;
  SixBitF32() : gather(six_bit_gather(0)), shifts(six_bit_shifts()), mask6(_mm512_set1_epi16(0x3f)) {}
  void operator()(const uint8_t* w, int64_t c, __m512& first, __m512& second) const {
    const __m512i raw = _mm512_maskz_loadu_epi8(0xffffffull, w + c / 4 * 3);
    const __m512i codes = _mm512_and_si512(six_bit_decode(raw, gather, shifts), mask6);
    first = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(codes)));
    second = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(codes, 1)));
  }
};
// 2, 3, 5 or 7 bits: a chunk of 32 codes is 4 * Bits bytes (4 units), decoded as bytes in natural order.
template <int Bits>
struct BitStreamF32 {
  static_assert(Bits >= 2 && Bits <= 7, "BitStreamF32 decodes 2- to 7-bit codes");
  __m512i gather, shifts, mask;
  BitStreamF32()
      : gather(bit_stream_gather<Bits>()), shifts(bit_stream_shifts<Bits>()), mask(_mm512_set1_epi8((1 << Bits) - 1)) {}
  void operator()(const uint8_t* w, int64_t c, __m512& first, __m512& second) const {
    const __m512i raw = _mm512_maskz_loadu_epi8((1ull << (4 * Bits)) - 1u, w + c / 8 * Bits);
    const __m512i codes = _mm512_and_si512(_mm512_multishift_epi64_epi8(shifts, _mm512_permutexvar_epi8(gather, raw)), mask);
    first = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_castsi512_si128(codes)));
    second = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, 1)));
  }
};
// 8-bit: one code per byte, natural order. Float32 only: 128 + q is not exact in bfloat16 for q
// above 127, so bfloat16 activations take this path too (the dispatcher converts x to float32).
struct EightBitF32 {
  EightBitF32() {}
  void operator()(const uint8_t* w, int64_t c, __m512& first, __m512& second) const {
    first = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c))));
    second = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c + 16))));
  }
};
// bfloat16 path: a chunk of 64 codes as two vectors of 32 bfloat16 values offset + q (kOffset).
struct FourBitBf16 {
  static constexpr float kOffset = 128.0f;
  __m512i nibble, bias128;
  FourBitBf16() : nibble(_mm512_set1_epi16(0x0f)), bias128(_mm512_set1_epi16(0x4300)) {}
  void operator()(const uint8_t* w, int64_t c, __m512i& first, __m512i& second) const {
    const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c / 2)));
    first = _mm512_ternarylogic_epi32(bytes, nibble, bias128, 0xEA);  // (A & B) | C
    second = _mm512_or_si512(_mm512_srli_epi16(bytes, 4), bias128);
  }
};
struct SixBitBf16 {
  static constexpr float kOffset = 128.0f;
  __m512i gather_a, gather_b, shifts, mask6, bias128;
  SixBitBf16()
      : gather_a(six_bit_gather(0)), gather_b(six_bit_gather(24)), shifts(six_bit_shifts()),
        mask6(_mm512_set1_epi16(0x3f)), bias128(_mm512_set1_epi16(0x4300)) {}
  void operator()(const uint8_t* w, int64_t c, __m512i& first, __m512i& second) const {
    const __m512i raw = _mm512_maskz_loadu_epi8(0xffffffffffffull, w + c / 4 * 3);
    first = _mm512_ternarylogic_epi32(six_bit_decode(raw, gather_a, shifts), mask6, bias128, 0xEA);
    second = _mm512_ternarylogic_epi32(six_bit_decode(raw, gather_b, shifts), mask6, bias128, 0xEA);
  }
};

// 2, 3, 5 or 7 bits: a chunk of 64 codes is 8 * Bits bytes (8 units), decoded as the bfloat16 values
// 2^Bits + q (exponent 127 + Bits, q in the top Bits bits of the 7-bit mantissa): the byte of each
// code is pulled from 7 - Bits bits lower than for the float32 path (wrapping round the 64-bit lane
// for the first code), which lands q at mantissa bit 7 - Bits. An offset of 2^Bits instead of the
// 4- and 6-bit paths' 128 keeps sum(x * (offset + q)) - offset * sum(x) from cancelling away float32
// precision when q spans a few values (a 2-bit layer lost 40x more of it with 128).
template <int Bits>
struct BitStreamBf16 {
  static_assert(Bits >= 2 && Bits <= 7, "BitStreamBf16 decodes 2- to 7-bit codes");
  static constexpr float kOffset = static_cast<float>(1 << Bits);
  __m512i gather, shifts, mask, exponent;
  static __m512i mantissa_shifts() {
    alignas(64) uint8_t ctrl[64];
    for (int u = 0; u < 8; ++u)
      for (int j = 0; j < 8; ++j) ctrl[8 * u + j] = static_cast<uint8_t>((Bits * j - (7 - Bits) + 64) % 64);
    return _mm512_load_si512(ctrl);
  }
  BitStreamBf16()
      : gather(bit_stream_gather<Bits>()), shifts(mantissa_shifts()),
        mask(_mm512_set1_epi8(static_cast<char>(((1 << Bits) - 1) << (7 - Bits)))),
        exponent(_mm512_set1_epi16(static_cast<int16_t>((127 + Bits) << 7))) {}
  void operator()(const uint8_t* w, int64_t c, __m512i& first, __m512i& second) const {
    const __m512i raw = _mm512_maskz_loadu_epi8((1ull << (8 * Bits)) - 1u, w + c / 8 * Bits);
    const __m512i codes = _mm512_and_si512(_mm512_multishift_epi64_epi8(shifts, _mm512_permutexvar_epi8(gather, raw)), mask);
    first = _mm512_or_si512(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(codes)), exponent);
    second = _mm512_or_si512(_mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(codes, 1)), exponent);
  }
};

// ---- one weight row against MR activation rows ---------------------------------------------
template <int MR, class Decode>
void row_f32(const GemvProblem& p, const float* xa, int64_t r0, int64_t row, __m512* out) {
  const uint8_t* w = p.packed + row * p.row_bytes;
  const Decode decode;
  alignas(64) float scales[kMaxGroups + 16];
  __m512 correction[MR];
  __m512 total[MR];
  for (int r = 0; r < MR; ++r) total[r] = _mm512_setzero_ps();
  row_prologue<MR>(p, row, r0, 0.0f, scales, correction);
  for (int64_t grp = 0; grp < p.groups; ++grp) {
    __m512 acc_a[MR], acc_b[MR];
    for (int r = 0; r < MR; ++r) { acc_a[r] = _mm512_setzero_ps(); acc_b[r] = _mm512_setzero_ps(); }
    for (int64_t c = grp * p.g; c < grp * p.g + p.g; c += kChunkF32) {
      __m512 first, second;
      decode(w, c, first, second);
      for (int r = 0; r < MR; ++r) {
        const float* xr = xa + r * p.k_padded + c;
        acc_a[r] = _mm512_fmadd_ps(first, _mm512_loadu_ps(xr), acc_a[r]);
        acc_b[r] = _mm512_fmadd_ps(second, _mm512_loadu_ps(xr + 16), acc_b[r]);
      }
    }
    const __m512 sv = _mm512_set1_ps(scales[grp]);
    for (int r = 0; r < MR; ++r) total[r] = _mm512_fmadd_ps(_mm512_add_ps(acc_a[r], acc_b[r]), sv, total[r]);
  }
  for (int r = 0; r < MR; ++r) out[r] = _mm512_sub_ps(total[r], correction[r]);
}

template <int MR, class Decode>
void row_bf16(const GemvProblem& p, const uint16_t* xa, int64_t r0, int64_t row, __m512* out) {
  const uint8_t* w = p.packed + row * p.row_bytes;
  const Decode decode;
  alignas(64) float scales[kMaxGroups + 16];
  __m512 correction[MR];
  __m512 total[MR];
  for (int r = 0; r < MR; ++r) total[r] = _mm512_setzero_ps();
  // The decoded values are offset + q: the offset joins the zero point in the correction.
  row_prologue<MR>(p, row, r0, Decode::kOffset, scales, correction);
  for (int64_t grp = 0; grp < p.groups; ++grp) {
    __m512 acc_a[MR], acc_b[MR];
    for (int r = 0; r < MR; ++r) { acc_a[r] = _mm512_setzero_ps(); acc_b[r] = _mm512_setzero_ps(); }
    for (int64_t c = grp * p.g; c < grp * p.g + p.g; c += kChunkBf16) {
      __m512i first, second;
      decode(w, c, first, second);
      for (int r = 0; r < MR; ++r) {
        const uint16_t* xr = xa + r * p.k_padded + c;
        acc_a[r] = _mm512_dpbf16_ps(acc_a[r], (__m512bh)first, (__m512bh)_mm512_loadu_si512(xr));
        acc_b[r] = _mm512_dpbf16_ps(acc_b[r], (__m512bh)second, (__m512bh)_mm512_loadu_si512(xr + 32));
      }
    }
    const __m512 sv = _mm512_set1_ps(scales[grp]);
    for (int r = 0; r < MR; ++r) total[r] = _mm512_fmadd_ps(_mm512_add_ps(acc_a[r], acc_b[r]), sv, total[r]);
  }
  for (int r = 0; r < MR; ++r) out[r] = _mm512_sub_ps(total[r], correction[r]);
}

// 4-bit codes against bfloat16 activations, 128 codes (one 64-byte load) per step: four decode
// vectors of 32 values 128 + q, summed by VDPBF16PS into one float vector whose lane j covers codes
// 8j..8j+7 of the block, so a per-lane scale vector applies each lane's group scale (blocks may
// span several groups, g dividing 128, or lie inside one, g a multiple of 128).
// The row is walked in chunks of 16 groups whose scales stay in one register, permuted per block:
// scales written to the stack and read back at other offsets stalled on store forwarding once per
// row, a large share of a 1024-input row (perf annotate of brecq_gemv_bench).
template <int MR>
void row_bf16_4bit_block(const GemvProblem& p, const uint16_t* xa, int64_t r0, int64_t row, __m512* out) {
  const uint8_t* w = p.packed + row * p.row_bytes;
  const uint16_t* scale_row = p.scale + row * p.groups;
  const uint8_t* zero_row = p.zero + row * p.groups;
  const __m512i nibble = _mm512_set1_epi16(0x000f), bias128 = _mm512_set1_epi16(0x4300);
  // Lane j's group within the block is 8j / g: g divides 128 here, so a shift by log2(g / 8)
  // (blocks inside one group, g >= 128: every lane 0).
  const int shift = p.g >= kBlock4 ? 4 : __builtin_ctzll(static_cast<unsigned long long>(p.g / 8));
  const __m512i lane_to_group = _mm512_srli_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), static_cast<unsigned>(shift));
  // The groups under a block advance by counting (a division per block cost more than the
  // block's arithmetic): g <= 128 moves 128 / g groups a block, g >= 128 one group every g / 128.
  const __m512i group_step = _mm512_set1_epi32(static_cast<int>(p.g <= kBlock4 ? kBlock4 / p.g : 1));
  const int64_t blocks_per_group = p.g >= kBlock4 ? p.g / kBlock4 : 1;
  const __m512 offset = _mm512_set1_ps(128.0f);  // the decoded values are 128 + q
  __m512 total[MR], correction[MR];
  for (int r = 0; r < MR; ++r) {
    total[r] = _mm512_setzero_ps();
    correction[r] = _mm512_setzero_ps();
  }
  for (int64_t g0 = 0; g0 < p.groups; g0 += 16) {
    const __m512 s = group_scales<MR>(p, scale_row, zero_row, g0, r0, offset, correction);
    const int64_t chunk_end = p.groups - g0 >= 16 ? (g0 + 16) * p.g : p.k_padded;
    __m512i lane_group = lane_to_group;
    int64_t blocks_in_group = 0;
    for (int64_t b = g0 * p.g; b < chunk_end; b += kBlock4) {
      const __m512i words = _mm512_loadu_si512(w + b / 2);
      const __m512i v0 = _mm512_ternarylogic_epi32(words, nibble, bias128, 0xEA);  // (A & B) | C
      const __m512i v1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 4), nibble, bias128, 0xEA);
      const __m512i v2 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 8), nibble, bias128, 0xEA);
      const __m512i v3 = _mm512_or_si512(_mm512_srli_epi16(words, 12), bias128);
      const __m512 block_scale = _mm512_permutexvar_ps(lane_group, s);
      if (++blocks_in_group == blocks_per_group) {
        blocks_in_group = 0;
        lane_group = _mm512_add_epi32(lane_group, group_step);
      }
      for (int r = 0; r < MR; ++r) {
        const uint16_t* xr = xa + r * p.k_padded + b;
        __m512 dot = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)v0, (__m512bh)_mm512_loadu_si512(xr));
        dot = _mm512_dpbf16_ps(dot, (__m512bh)v1, (__m512bh)_mm512_loadu_si512(xr + 32));
        dot = _mm512_dpbf16_ps(dot, (__m512bh)v2, (__m512bh)_mm512_loadu_si512(xr + 64));
        dot = _mm512_dpbf16_ps(dot, (__m512bh)v3, (__m512bh)_mm512_loadu_si512(xr + 96));
        total[r] = _mm512_fmadd_ps(dot, block_scale, total[r]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) out[r] = _mm512_sub_ps(total[r], correction[r]);
}

template <int MR> void row_f32_4bit(const GemvProblem& p, const float* x, int64_t r0, int64_t row, __m512* out) {
  row_f32<MR, FourBitF32>(p, x, r0, row, out);
}
template <int MR> void row_f32_8bit(const GemvProblem& p, const float* x, int64_t r0, int64_t row, __m512* out) {
  row_f32<MR, EightBitF32>(p, x, r0, row, out);
}
template <int MR> void row_f32_6bit(const GemvProblem& p, const float* x, int64_t r0, int64_t row, __m512* out) {
  row_f32<MR, SixBitF32>(p, x, r0, row, out);
}
template <int MR> void row_bf16_4bit(const GemvProblem& p, const uint16_t* x, int64_t r0, int64_t row, __m512* out) {
  row_bf16<MR, FourBitBf16>(p, x, r0, row, out);
}
template <int MR> void row_bf16_6bit(const GemvProblem& p, const uint16_t* x, int64_t r0, int64_t row, __m512* out) {
  row_bf16<MR, SixBitBf16>(p, x, r0, row, out);
}

template <int Bits>
struct BitStreamRows {
  template <int MR>
  static void f32(const GemvProblem& p, const float* x, int64_t r0, int64_t row, __m512* out) {
    row_f32<MR, BitStreamF32<Bits>>(p, x, r0, row, out);
  }
  template <int MR>
  static void bf16(const GemvProblem& p, const uint16_t* x, int64_t r0, int64_t row, __m512* out) {
    row_bf16<MR, BitStreamBf16<Bits>>(p, x, r0, row, out);
  }
};

// Each row function leaves, per activation row, an unreduced vector whose lanes sum to the
// output; a tile of kTileRows weight rows is reduced together (reduce4), since a horizontal sum
// per output was a visible share of a 1024-input row's time.
template <typename X>
using RowFn = void (*)(const GemvProblem&, const X*, int64_t, int64_t, __m512*);

constexpr int64_t kTileRows = 4;

// Lane sums of a, b, c, d, in that order.
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

template <typename X, RowFn<X> Row1, RowFn<X> Row2, RowFn<X> Row3, RowFn<X> Row4>
void run_rows(const GemvProblem& p, const X* xa) {
  const int64_t tiles = (p.n + kTileRows - 1) / kTileRows;
  const int64_t ahead_rows = (kPrefetchBytes + p.row_bytes - 1) / p.row_bytes;
  for_each_index(tiles, p.threads, [&](int64_t tile) {
    const int64_t first = tile * kTileRows;
    const int64_t rows_here = p.n - first < kTileRows ? p.n - first : kTileRows;
    for (int64_t r0 = 0; r0 < p.m; r0 += kRowsPerPass) {
      const X* xr = xa + r0 * p.k_padded;
      const int64_t pass = p.m - r0 >= kRowsPerPass ? kRowsPerPass : p.m - r0;
      __m512 partial[kTileRows][kRowsPerPass];
      for (int64_t i = 0; i < kTileRows; ++i)
        for (int r = 0; r < kRowsPerPass; ++r) partial[i][r] = _mm512_setzero_ps();
      for (int64_t i = 0; i < rows_here; ++i) {
        const int64_t row = first + i;
        if (r0 == 0 && row + ahead_rows < p.n) prefetch_weight_row(p, row + ahead_rows);
        switch (pass) {
          case 1: Row1(p, xr, r0, row, partial[i]); break;
          case 2: Row2(p, xr, r0, row, partial[i]); break;
          case 3: Row3(p, xr, r0, row, partial[i]); break;
          default: Row4(p, xr, r0, row, partial[i]); break;
        }
      }
      for (int64_t r = 0; r < pass; ++r) {
        alignas(16) float sums[kTileRows];
        _mm_store_ps(sums, reduce4(partial[0][r], partial[1][r], partial[2][r], partial[3][r]));
        for (int64_t i = 0; i < rows_here; ++i) {
          const int64_t row = first + i;
          p.store((r0 + r) * p.n + row, sums[i] + (p.bias ? p.bias[row] : 0.0f));
        }
      }
    }
  });
}

#define BRECQ_RUN_ROWS(fn, X) run_rows<X, fn<1>, fn<2>, fn<3>, fn<4>>

// 2, 3, 5 and 7 bits, bfloat16 activations as they are (whole 64-code chunks per group) or float32.
template <int Bits>
bool gemv_bit_stream(const GemvProblem& p) {
  using R = BitStreamRows<Bits>;
  if (p.x_bf16 && bf16_instructions() && p.g % kChunkBf16 == 0) {  // VDPBF16PS: see gemv_avx512
    run_rows<uint16_t, R::template bf16<1>, R::template bf16<2>, R::template bf16<3>, R::template bf16<4>>(
        p, p.x_bf16);
    return true;
  }
  if (p.g % kChunkF32 != 0) return false;
  run_rows<float, R::template f32<1>, R::template f32<2>, R::template f32<3>, R::template f32<4>>(p, p.x);
  return true;
}

// ---- dequantization of packed rows (the GEMM path's workspace) ------------------------------
// 32 codes at a time, as 32 float32 values in natural order (dequant_avx512.h).
struct FourBitNatural {
  FourBitNatural() {}
  void operator()(const uint8_t* w, int64_t c, __m512& first, __m512& second) const {
    nibbles_to_f32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c / 2)), first, second);
  }
};

template <class Decode>
void dequantize_rows(const uint8_t* packed, const uint16_t* scale, const uint8_t* zero, int64_t n, int64_t k,
                     int64_t g, int64_t row_bytes, int64_t groups, void* out, bool out_bf16, int threads) {
  const int64_t out_bytes = out_bf16 ? 2 : 4;
  const bool native_bf16 = bf16_instructions();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t row = 0; row < n; ++row) {
    const Decode decode;
    const uint8_t* w = packed + row * row_bytes;
    for (int64_t grp = 0; grp < groups; ++grp) {
      const __m512 s = _mm512_set1_ps(_cvtsh_ss(scale[row * groups + grp]));
      const __m512 z = _mm512_set1_ps(static_cast<float>(zero[row * groups + grp]));
      for (int64_t c = grp * g; c < grp * g + g && c < k; c += 32) {
        __m512 first, second;
        decode(w, c, first, second);
        // the row holds k values; codes past k are padding
        store_dequantized(first, second, s, z, k - c, static_cast<char*>(out) + (row * k + c) * out_bytes, out_bf16,
                          native_bf16);
      }
    }
  }
}

}  // namespace

bool gemv_avx512(const GemvProblem& p) {
  if (p.groups > kMaxGroups) return false;
  switch (p.bits) {
    case 2: return gemv_bit_stream<2>(p);
    case 3: return gemv_bit_stream<3>(p);
    case 5: return gemv_bit_stream<5>(p);
    case 7: return gemv_bit_stream<7>(p);
    case 4: case 6: case 8: break;
    default: return false;
  }
  if (p.bits == 8) {
    if (p.g % kChunkF32 != 0) return false;
    BRECQ_RUN_ROWS(row_f32_8bit, float)(p, p.x);
    return true;
  }
  static_assert(kRowsPerPass == 4, "row dispatch below handles up to 4 rows per pass");
  // The bfloat16 kernels' dot product is VDPBF16PS; without it (Isa::kAvx512Vnni) the float32 kernels
  // take x's float32 copy.
  const bool bf16_dot = p.x_bf16 && bf16_instructions();
  if (bf16_dot && p.bits == 4 && p.k_padded % kBlock4 == 0 && (kBlock4 % p.g == 0 || p.g % kBlock4 == 0)) {
    uint16_t* xa = reinterpret_cast<uint16_t*>(p.scratch);
    for (int64_t r = 0; r < p.m; ++r)
      arrange_by_nibble_bf16(p.x_bf16 + r * p.k_padded, p.k_padded, xa + r * p.k_padded);
    BRECQ_RUN_ROWS(row_bf16_4bit_block, uint16_t)(p, xa);
    return true;
  }
  if (bf16_dot && p.g % kChunkBf16 == 0) {
    uint16_t* xa = reinterpret_cast<uint16_t*>(p.scratch);
    if (p.bits == 4) {
      for (int64_t r = 0; r < p.m; ++r)
        arrange_even_odd_bf16(p.x_bf16 + r * p.k_padded, p.k_padded, kChunkBf16, xa + r * p.k_padded);
      BRECQ_RUN_ROWS(row_bf16_4bit, uint16_t)(p, xa);
    } else {
      BRECQ_RUN_ROWS(row_bf16_6bit, uint16_t)(p, p.x_bf16);
    }
    return true;
  }
  if (p.g % kChunkF32 != 0) return false;
  if (p.bits == 4) {
    for (int64_t r = 0; r < p.m; ++r)
      arrange_even_odd_f32(p.x + r * p.k_padded, p.k_padded, kChunkF32, p.scratch + r * p.k_padded);
    BRECQ_RUN_ROWS(row_f32_4bit, float)(p, p.scratch);
  } else {
    BRECQ_RUN_ROWS(row_f32_6bit, float)(p, p.x);
  }
  return true;
}

bool dequantize_packed_avx512(const uint8_t* packed, const uint16_t* scale, const uint8_t* zero, int64_t n,
                              int64_t k, int bits, int64_t g, void* out, bool out_bf16, int threads) {
  // A run of 32 codes must lie in one group (it then starts on a byte boundary at every width).
  if (g % 32 != 0) return false;  // 8 bits: no decoder here (the switch below)
  const int64_t row_bytes = packed_row_bytes(k, g, bits), groups = num_groups(k, g);
#define BRECQ_DEQUANTIZE(Decode) \
  dequantize_rows<Decode>(packed, scale, zero, n, k, g, row_bytes, groups, out, out_bf16, threads)
  switch (bits) {
    case 2: BRECQ_DEQUANTIZE(BitStreamF32<2>); break;
    case 3: BRECQ_DEQUANTIZE(BitStreamF32<3>); break;
    case 4: BRECQ_DEQUANTIZE(FourBitNatural); break;
    case 5: BRECQ_DEQUANTIZE(BitStreamF32<5>); break;
    case 6: BRECQ_DEQUANTIZE(SixBitF32); break;
    case 7: BRECQ_DEQUANTIZE(BitStreamF32<7>); break;
    default: return false;
  }
#undef BRECQ_DEQUANTIZE
  return true;
}

}  // namespace detail
}  // namespace brecq

#undef BRECQ_RUN_ROWS
#pragma GCC pop_options
#else
namespace brecq {
namespace detail {
bool gemv_avx512(const GemvProblem&) { return false; }
bool dequantize_packed_avx512(const uint8_t*, const uint16_t*, const uint8_t*, int64_t, int64_t, int, int64_t, void*,
                              bool, int) {
  return false;
}
}  // namespace detail
}  // namespace brecq
#endif
