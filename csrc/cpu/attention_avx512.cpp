// Decode attention over a bfloat16 cache with AVX-512 (BF16): the path brecq's decoder takes at
// long contexts, where attention, not the weights, is most of a step.
//
// The portable kernel (attention.cpp) widens four cache rows at a time to float32 in a scratch
// buffer and reduces each score horizontally: at 2048 cached tokens it read the cache at about 5 GB/s
// per thread, far below memory. Here a key row is never widened: VDPBF16PS multiplies it with the
// query (kept as bfloat16, exact: the decoder's queries are bfloat16 values) in pairs, 32 products
// an instruction, four rows side by side, and the scale is applied to the finished score. The value
// pass widens each row once into registers and adds it to every query head's accumulator. Same contract as
// decode_attention (brecq/kernels.h); taken for bfloat16 without a key mask and head_dim a multiple
// of 32 up to 256, else the portable kernel runs. On CPUs with AVX-512 but not its BF16 instructions
// (Isa::kAvx512Vnni) the same loops run with each VDPBF16PS done as two FMAs on the pairs' odd and
// even halves widened to float32 (in the instruction's order: odd products first), and the output
// rounded to bfloat16 in integer steps.
#include <cmath>
#include <cstdint>
#include <vector>

#include "attention_items.h"
#include "brecq/kernels.h"
#include "gemv.h"
#include "numeric.h"

#if defined(__x86_64__) && defined(BRECQ_HAVE_X86_DISPATCH)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#include <immintrin.h>

#include "dequant_avx512.h"  // bf16_bits

namespace brecq {
namespace detail {
namespace {

constexpr int64_t kMaxDim = 256;    // head_dim in 32-element chunks: up to 8 of them
constexpr int64_t kMaxGroup = 16;   // query heads per key/value head held here
// Cache rows are requested this many rows ahead of use (4 KiB at head_dim 128). On the session-15
// VM (Emerald Rapids, avx512vnni; `brecq_attention_bench KV_LEN LAYERS`, alternating builds, 4
// rounds): 28 layers at 2048 tokens from memory 12.5-13.5 -> 10.7-11.4 ms (90-94 % -> 105-111 % of a
// plain read of the same bytes), 28 at 512 tokens 2.9-3.3 -> 2.6 ms, one layer in cache 173-202 ->
// 158-166 us. 32 rows measured the same as 16. Requests past a head's last row read nothing the
// kernel uses and cannot fault.
constexpr int64_t kAheadRows = 16;

// Requests a cache row's C x 64 bytes.
template <int C>
BRECQ_ALWAYS_INLINE void prefetch_row(const uint16_t* row) {
  for (int c = 0; c < C; ++c) __builtin_prefetch(row + 32 * c, 0, 3);
}

// sum + the pairwise products of 32 bfloat16 values: VDPBF16PS, or (Native false) the same products
// as two FMAs, odd elements first as the instruction adds them.
template <bool Native>
BRECQ_ALWAYS_INLINE __m512 dot_pairs(__m512 sum, __m512i a, __m512i b) {
  if constexpr (Native) {
    return _mm512_dpbf16_ps(sum, (__m512bh)a, (__m512bh)b);
  } else {
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    sum = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, high)), _mm512_castsi512_ps(_mm512_and_si512(b, high)),
                          sum);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)),
                           sum);
  }
}

// e^x for x <= 0, sixteen at a time: the AVX2 kernel's exp_nonpositive (attention_avx2.cpp) on
// 512-bit registers.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// 16 bfloat16 values (bits) widened to float32.
inline __m512 widen(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// Lane sums of 16 vectors: result lane i = the sum of v[i]'s 16 lanes. Pairs, then quads, are
// folded within 128-bit lanes, then the four 128-bit lanes across: 45 instructions for 16 sums,
// against about 9 each for _mm512_reduce_add_ps.
inline __m512 sums16(const __m512* v) {
  __m512 x[8], y[4];
  for (int k = 0; k < 8; ++k)
    x[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int m = 0; m < 4; ++m) {
    const __m512d a = _mm512_castps_pd(x[2 * m]), b = _mm512_castps_pd(x[2 * m + 1]);
    y[m] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // y[m], 128-bit lane L, slot s: lane L's share of key 4m + s.
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x44), _mm512_shuffle_f32x4(y[0], y[1], 0xee));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x44), _mm512_shuffle_f32x4(y[2], y[3], 0xee));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xdd));
}

// The value pass with every accumulator in a register: G query heads of C x 32 elements. A 512-bit
// load of 32 bfloat16 values gives their even elements as float32 by a shift and the odd ones by a
// mask, two cheap lane-wise operations where widening 16 at a time (VPMOVZXWD) costs a shuffle each;
// the accumulators hold even and odd elements apart and are interleaved once at the end. Every
// element sees the same multiply-adds in the same order either way.
template <int G, int C>
void weighted_values(const uint16_t* v, int64_t kv_len, int64_t v_stride_l, const float* scores, int64_t padded,
                     float* acc) {
  __m512 even[G][C], odd[G][C];
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < C; ++c) even[j][c] = odd[j][c] = _mm512_setzero_ps();
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t l = 0; l < kv_len; ++l) {
    const uint16_t* row = v + l * v_stride_l;
    prefetch_row<C>(row + kAheadRows * v_stride_l);
    __m512 value_even[C], value_odd[C];
    for (int c = 0; c < C; ++c) {
      const __m512i pair = _mm512_loadu_si512(row + 32 * c);
      value_even[c] = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
      value_odd[c] = _mm512_castsi512_ps(_mm512_and_si512(pair, high_half));
    }
    for (int j = 0; j < G; ++j) {
      const __m512 p = _mm512_set1_ps(scores[j * padded + l]);
      for (int c = 0; c < C; ++c) {
        even[j][c] = _mm512_fmadd_ps(p, value_even[c], even[j][c]);
        odd[j][c] = _mm512_fmadd_ps(p, value_odd[c], odd[j][c]);
      }
    }
  }
  const __m512i low_order = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i high_order = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < C; ++c) {
      _mm512_storeu_ps(acc + j * 32 * C + 32 * c, _mm512_permutex2var_ps(even[j][c], low_order, odd[j][c]));
      _mm512_storeu_ps(acc + j * 32 * C + 32 * c + 16, _mm512_permutex2var_ps(even[j][c], high_order, odd[j][c]));
    }
}

// Scores of 16 keys for G query heads of C x 32 elements: four key rows at a time, so that G x 4
// chains of VDPBF16PS run side by side instead of one (a chain is C dependent instructions; alone,
// its latency, not the loads, set the pace). Each chain adds its chunks in order, as the generic
// loop does, so the scores are the same bit for bit.
template <int G, int C, bool Native>
void scores16(const uint16_t* k, int64_t at, int64_t kv_len, int64_t k_stride_l, const __m512i (*query)[kMaxDim / 32],
              __m512 (*sums)[16]) {
  for (int64_t r = 0; r < 16; r += 4) {
    const uint16_t* row[4];
    for (int i = 0; i < 4; ++i) {
      const int64_t l = at + r + i < kv_len ? at + r + i : kv_len - 1;  // past the end: a real row, masked later
      row[i] = k + l * k_stride_l;
      prefetch_row<C>(row[i] + kAheadRows * k_stride_l);
    }
    __m512 sum[G][4];
    for (int j = 0; j < G; ++j)
      for (int i = 0; i < 4; ++i) sum[j][i] = _mm512_setzero_ps();
    for (int c = 0; c < C; ++c) {
      __m512i key[4];
      for (int i = 0; i < 4; ++i) key[i] = _mm512_loadu_si512(row[i] + 32 * c);
      for (int j = 0; j < G; ++j)
        for (int i = 0; i < 4; ++i) sum[j][i] = dot_pairs<Native>(sum[j][i], key[i], query[j][c]);
    }
    for (int j = 0; j < G; ++j)
      for (int i = 0; i < 4; ++i) sums[j][r + i] = sum[j][i];
  }
}

struct Scratch {
  std::vector<float> scores;  // [group][kv_len + 16]
  std::vector<float> acc;     // [group][head_dim]
};

template <bool Native>
void attend_item(const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t group, int64_t kv_len, int64_t d,
                 int64_t k_stride_l, int64_t v_stride_l, float scale, uint16_t* out, Scratch& scratch) {
  const int64_t chunks = d / 32;  // 32 bfloat16 per 512-bit vector
  const int64_t padded = (kv_len + 15) / 16 * 16;
  scratch.scores.resize(group * padded);
  scratch.acc.resize(group * d);
  float* scores = scratch.scores.data();

  // Scores: one VDPBF16PS per 32 elements of a key row and query head.
  __m512i query[kMaxGroup][kMaxDim / 32];
  for (int64_t j = 0; j < group; ++j)
    for (int64_t c = 0; c < chunks; ++c) query[j][c] = _mm512_loadu_si512(q + j * d + 32 * c);
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t at = 0; at < padded; at += 16) {
    __m512 sums[kMaxGroup][16];
    if (group == 2 && chunks == 4) {
      scores16<2, 4, Native>(k, at, kv_len, k_stride_l, query, sums);
    } else if (group == 1 && chunks == 4) {
      scores16<1, 4, Native>(k, at, kv_len, k_stride_l, query, sums);
    } else if (group == 2 && chunks == 2) {
      scores16<2, 2, Native>(k, at, kv_len, k_stride_l, query, sums);
    } else if (group == 4 && chunks == 2) {
      scores16<4, 2, Native>(k, at, kv_len, k_stride_l, query, sums);
    } else if (group == 4 && chunks == 4) {
      scores16<4, 4, Native>(k, at, kv_len, k_stride_l, query, sums);
    } else {
    for (int64_t r = 0; r < 16; ++r) {
      const int64_t l = at + r < kv_len ? at + r : kv_len - 1;  // past the end: a real row, masked below
      const uint16_t* row = k + l * k_stride_l;
      __m512i key[kMaxDim / 32];
      for (int64_t c = 0; c < chunks; ++c) key[c] = _mm512_loadu_si512(row + 32 * c);
      for (int64_t j = 0; j < group; ++j) {
        __m512 sum = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c)
          sum = dot_pairs<Native>(sum, key[c], query[j][c]);
        sums[j][r] = sum;
      }
    }
    }
    for (int64_t j = 0; j < group; ++j) _mm512_storeu_ps(scores + j * padded + at, _mm512_mul_ps(sums16(sums[j]), scale_v));
  }

  // Softmax of each head's scores (the tail of the last 16 masked off).
  float inverse_sum[kMaxGroup];
  const __mmask16 tail = static_cast<__mmask16>(kv_len % 16 ? (1u << (kv_len % 16)) - 1u : 0xffffu);
  for (int64_t j = 0; j < group; ++j) {
    float* sj = scores + j * padded;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t at = 0; at < padded; at += 16) {
      const __mmask16 m = at + 16 <= kv_len ? static_cast<__mmask16>(0xffffu) : tail;
      top = _mm512_mask_max_ps(top, m, top, _mm512_maskz_loadu_ps(m, sj + at));
    }
    const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t at = 0; at < padded; at += 16) {
      const __mmask16 m = at + 16 <= kv_len ? static_cast<__mmask16>(0xffffu) : tail;
      const __m512 e = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sj + at), max)));
      _mm512_storeu_ps(sj + at, e);
      sum = _mm512_add_ps(sum, e);
    }
    inverse_sum[j] = 1.0f / _mm512_reduce_add_ps(sum);
  }

  // Weighted sum of values: each row widened once, added to every head's accumulator.
  float* acc = scratch.acc.data();
  if (group == 1 && d == 128) {
    weighted_values<1, 4>(v, kv_len, v_stride_l, scores, padded, acc);
  } else if (group == 2 && d == 128) {
    weighted_values<2, 4>(v, kv_len, v_stride_l, scores, padded, acc);
  } else if (group == 2 && d == 64) {
    weighted_values<2, 2>(v, kv_len, v_stride_l, scores, padded, acc);
  } else if (group == 4 && d == 64) {
    weighted_values<4, 2>(v, kv_len, v_stride_l, scores, padded, acc);
  } else {
  for (int64_t i = 0; i < group * d; ++i) acc[i] = 0.0f;
  for (int64_t l = 0; l < kv_len; ++l) {
    const uint16_t* row = v + l * v_stride_l;
    __m512 value[kMaxDim / 16];
    for (int64_t c = 0; c < 2 * chunks; ++c)
      value[c] = widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * c)));
    for (int64_t j = 0; j < group; ++j) {
      const __m512 p = _mm512_set1_ps(scores[j * padded + l]);
      float* aj = acc + j * d;
      for (int64_t c = 0; c < 2 * chunks; ++c)
        _mm512_storeu_ps(aj + 16 * c, _mm512_fmadd_ps(p, value[c], _mm512_loadu_ps(aj + 16 * c)));
    }
  }
  }
  for (int64_t j = 0; j < group; ++j) {
    const __m512 inverse = _mm512_set1_ps(inverse_sum[j]);
    for (int64_t c = 0; c < 2 * chunks; ++c) {
      const __m512 o = _mm512_mul_ps(_mm512_loadu_ps(acc + j * d + 16 * c), inverse);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j * d + 16 * c), bf16_bits(o, Native));
    }
  }
}

}  // namespace

bool decode_attention_avx512(const void* q, const void* k, const void* v, const uint8_t* key_mask, bool bf16,
                             int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t kv_len, int64_t head_dim,
                             int64_t k_stride_b, int64_t k_stride_h, int64_t k_stride_l, int64_t v_stride_b,
                             int64_t v_stride_h, int64_t v_stride_l, float scale, void* out, int threads) {
  const int64_t group = q_heads / kv_heads;
  if (!bf16 || key_mask || kv_len < 1 || head_dim % 32 || head_dim > kMaxDim || group > kMaxGroup) return false;
  attend_bf16_items<Scratch>(bf16_instructions() ? attend_item<true> : attend_item<false>, q, k, v, batch, q_heads,
                             kv_heads, kv_len, head_dim, k_stride_b, k_stride_h, k_stride_l, v_stride_b, v_stride_h,
                             v_stride_l, scale, out, threads);
  return true;
}

}  // namespace detail
}  // namespace brecq
#pragma GCC pop_options

#else
namespace brecq {
namespace detail {
bool decode_attention_avx512(const void*, const void*, const void*, const uint8_t*, bool, int64_t, int64_t, int64_t,
                             int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, void*, int) {
  return false;
}
}  // namespace detail
}  // namespace brecq
#endif
