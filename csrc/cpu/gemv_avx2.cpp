// AVX2/FMA GEMV for packed weights of every width, 2 to 8 bits, float32 activations (bfloat16 ones
// are widened by the dispatcher). Same structure as gemv_avx512.cpp with 8-lane vectors; see that file for the
// arrangement of activations. No standard-library templates below the target pragma.
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "gemv.h"

#if defined(__x86_64__) && defined(BRECQ_HAVE_X86_DISPATCH)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace brecq {
namespace detail {
namespace {

constexpr int kChunk = 16;  // codes per inner step
constexpr int64_t kPrefetchRows = 8;  // weight rows requested ahead of use (hides DRAM latency)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---- code decoders: per-row constants, then 16 codes per call as two vectors of 8 floats, in the
// order of the activations they multiply. Constructors are written out: GCC compiles implicit ones
// without the target pragma.
struct FourBit {  // low nibbles first, then high ones (activations arranged to match)
  __m256i low_nibble;
  FourBit() : low_nibble(_mm256_set1_epi32(0x0f)) {}
  void operator()(const uint8_t* w, int64_t c, __m256& first, __m256& second) const {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + c / 2)));
    first = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, low_nibble));
    second = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
  }
};
struct SixBit {  // natural order
  __m256i gather_a, gather_b, shifts, mask6;
  __m128i first_12_bytes;
  // Dword lane i of each 128-bit half takes the two bytes holding code i of a 6-byte run.
  SixBit()
      : gather_a(_mm256_setr_epi8(0, 1, -1, -1, 0, 1, -1, -1, 1, 2, -1, -1, 2, 3, -1, -1,
                                  3, 4, -1, -1, 3, 4, -1, -1, 4, 5, -1, -1, 5, 6, -1, -1)),
        gather_b(_mm256_add_epi8(gather_a, _mm256_setr_epi8(6, 6, 0, 0, 6, 6, 0, 0, 6, 6, 0, 0, 6, 6, 0, 0,
                                                            6, 6, 0, 0, 6, 6, 0, 0, 6, 6, 0, 0, 6, 6, 0, 0))),
        shifts(_mm256_setr_epi32(0, 6, 4, 2, 0, 6, 4, 2)), mask6(_mm256_set1_epi32(0x3f)),
        first_12_bytes(_mm_setr_epi32(-1, -1, -1, 0)) {}
  void operator()(const uint8_t* w, int64_t c, __m256& first, __m256& second) const {
    // 16 codes = 12 bytes, loaded masked so as never to read past the row. (Copying them to the
    // stack and loading 16 bytes back stalled on store forwarding: W6 ran 8x slower than W4.)
    const __m128i run = _mm_maskload_epi32(reinterpret_cast<const int*>(w + c / 4 * 3), first_12_bytes);
    const __m256i raw = _mm256_broadcastsi128_si256(run);
    first = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(raw, gather_a), shifts), mask6));
    second = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(raw, gather_b), shifts), mask6));
  }
};
// 2, 3, 5 or 7 bits, natural order: 16 codes are 2 * Bits bytes of the row's bit stream, loaded
// exactly (whole dwords masked, then a last 16-bit word when 2 * Bits is not a multiple of 4), so
// that no read passes the row's end. Code q starts at bit Bits * q, inside byte Bits * q / 8, and
// shift + Bits <= 14: dword lane i takes the two bytes from there (VPSHUFB), VPSRLVD drops the
// shift, a mask the bits above. The same steps as SixBit, whose shuffle is this one's at 6 bits.
template <int Bits>
struct BitStream {
  static_assert(Bits >= 2 && Bits <= 7, "BitStream decodes 2- to 7-bit codes");
  static constexpr int kBytes = 2 * Bits;  // one call's 16 codes
  __m256i gather_a, gather_b, shifts, mask;
  __m128i whole_dwords;
  static __m256i gather(int first_code) {
    alignas(32) int8_t idx[32];
    for (int i = 0; i < 8; ++i) {
      const int byte = Bits * (first_code + i) / 8;
      idx[4 * i] = static_cast<int8_t>(byte);  // within the 128-bit half: both halves hold the run
      idx[4 * i + 1] = static_cast<int8_t>(byte + 1 < 16 ? byte + 1 : -1);
      idx[4 * i + 2] = idx[4 * i + 3] = -1;
    }
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(idx));
  }
  BitStream()
      : gather_a(gather(0)), gather_b(gather(8)),
        shifts(_mm256_setr_epi32(0, Bits % 8, 2 * Bits % 8, 3 * Bits % 8, 4 * Bits % 8, 5 * Bits % 8, 6 * Bits % 8,
                                 7 * Bits % 8)),
        mask(_mm256_set1_epi32((1 << Bits) - 1)),
        whole_dwords(_mm_setr_epi32(kBytes >= 4 ? -1 : 0, kBytes >= 8 ? -1 : 0, kBytes >= 12 ? -1 : 0, 0)) {}
  void operator()(const uint8_t* w, int64_t c, __m256& first, __m256& second) const {
    const uint8_t* run_bytes = w + c / 8 * Bits;
    __m128i run = _mm_maskload_epi32(reinterpret_cast<const int*>(run_bytes), whole_dwords);
    if (kBytes % 4 != 0) {
      uint16_t last;
      std::memcpy(&last, run_bytes + kBytes - 2, 2);
      run = _mm_insert_epi16(run, last, (kBytes - 2) / 2);
    }
    const __m256i raw = _mm256_broadcastsi128_si256(run);
    first = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(raw, gather_a), shifts), mask));
    second = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(raw, gather_b), shifts), mask));
  }
};
struct EightBit {  // one code per byte, natural order
  EightBit() {}
  void operator()(const uint8_t* w, int64_t c, __m256& first, __m256& second) const {
    first = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + c))));
    second = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + c + 8))));
  }
};

template <int MR, class Decode>
void row(const GemvProblem& p, const float* xa, int64_t r0, int64_t row) {
  const uint8_t* w = p.packed + row * p.row_bytes;
  const Decode decode;
  __m256 total[MR];
  float correction[MR];
  for (int r = 0; r < MR; ++r) { total[r] = _mm256_setzero_ps(); correction[r] = 0.0f; }
  for (int64_t grp = 0; grp < p.groups; ++grp) {
    __m256 acc_a[MR], acc_b[MR];
    for (int r = 0; r < MR; ++r) { acc_a[r] = _mm256_setzero_ps(); acc_b[r] = _mm256_setzero_ps(); }
    for (int64_t c = grp * p.g; c < grp * p.g + p.g; c += kChunk) {
      __m256 first, second;
      decode(w, c, first, second);
      for (int r = 0; r < MR; ++r) {
        const float* xr = xa + r * p.k_padded + c;
        acc_a[r] = _mm256_fmadd_ps(first, _mm256_loadu_ps(xr), acc_a[r]);
        acc_b[r] = _mm256_fmadd_ps(second, _mm256_loadu_ps(xr + 8), acc_b[r]);
      }
    }
    const float s = _cvtsh_ss(p.scale[row * p.groups + grp]);  // F16C: the portable conversion branches
    const float sz = s * static_cast<float>(p.zero[row * p.groups + grp]);
    const __m256 sv = _mm256_set1_ps(s);
    for (int r = 0; r < MR; ++r) {
      total[r] = _mm256_fmadd_ps(_mm256_add_ps(acc_a[r], acc_b[r]), sv, total[r]);
      correction[r] += sz * p.xsum[(r0 + r) * p.groups + grp];
    }
  }
  const float b = p.bias ? p.bias[row] : 0.0f;
  for (int r = 0; r < MR; ++r) p.store((r0 + r) * p.n + row, hsum(total[r]) - correction[r] + b);
}

template <void (*Row1)(const GemvProblem&, const float*, int64_t, int64_t),
          void (*Row2)(const GemvProblem&, const float*, int64_t, int64_t),
          void (*Row3)(const GemvProblem&, const float*, int64_t, int64_t),
          void (*Row4)(const GemvProblem&, const float*, int64_t, int64_t)>
void run_rows(const GemvProblem& p, const float* xa) {
  for_each_index(p.n, p.threads, [&](int64_t row) {
    if (row + kPrefetchRows < p.n) prefetch_weight_row(p, row + kPrefetchRows);
    for (int64_t r0 = 0; r0 < p.m; r0 += kRowsPerPass) {
      const float* xr = xa + r0 * p.k_padded;
      switch (p.m - r0 >= kRowsPerPass ? kRowsPerPass : p.m - r0) {
        case 1: Row1(p, xr, r0, row); break;
        case 2: Row2(p, xr, r0, row); break;
        case 3: Row3(p, xr, r0, row); break;
        default: Row4(p, xr, r0, row); break;
      }
    }
  });
}

}  // namespace

bool gemv_avx2(const GemvProblem& p) {
  if (p.bits < kMinBits || p.bits > kMaxBits || p.g % kChunk != 0) return false;
  static_assert(kRowsPerPass == 4, "run_rows handles up to 4 rows per pass");
#define BRECQ_BIT_STREAM(B) \
  run_rows<row<1, BitStream<B>>, row<2, BitStream<B>>, row<3, BitStream<B>>, row<4, BitStream<B>>>(p, p.x)
  if (p.bits == 2) {
    BRECQ_BIT_STREAM(2);
  } else if (p.bits == 3) {
    BRECQ_BIT_STREAM(3);
  } else if (p.bits == 5) {
    BRECQ_BIT_STREAM(5);
  } else if (p.bits == 7) {
    BRECQ_BIT_STREAM(7);
  } else if (p.bits == 4) {
    for (int64_t r = 0; r < p.m; ++r) {
      const float* x = p.x + r * p.k_padded;
      float* out = p.scratch + r * p.k_padded;
      for (int64_t c = 0; c < p.k_padded; c += kChunk)
        for (int i = 0; i < kChunk / 2; ++i) {
          out[c + i] = x[c + 2 * i];
          out[c + kChunk / 2 + i] = x[c + 2 * i + 1];
        }
    }
    run_rows<row<1, FourBit>, row<2, FourBit>, row<3, FourBit>, row<4, FourBit>>(p, p.scratch);
  } else if (p.bits == 6) {
    run_rows<row<1, SixBit>, row<2, SixBit>, row<3, SixBit>, row<4, SixBit>>(p, p.x);
  } else {
    run_rows<row<1, EightBit>, row<2, EightBit>, row<3, EightBit>, row<4, EightBit>>(p, p.x);
  }
#undef BRECQ_BIT_STREAM
  return true;
}

}  // namespace detail
}  // namespace brecq

#pragma GCC pop_options
#else
namespace brecq {
namespace detail {
bool gemv_avx2(const GemvProblem&) { return false; }
}  // namespace detail
}  // namespace brecq
#endif
