// Decode attention over a bfloat16 cache with AVX2 and FMA: the bfloat16 path for CPUs without
// AVX-512 (and the one this build's AVX2 baseline runs when AVX-512 is switched off).
//
// The portable kernel (attention.cpp) widens every cache row into a float32 buffer before its dot
// products and its weighted sum; on bfloat16 caches that copy, not memory, set its pace (about 11
// GB/s a thread from cache on the Zen 4 VM, 55 % of a plain read from memory on 2 threads). Here a
// 256-bit load of 16 bfloat16 values is split in registers into its even and its odd elements as
// float32 (a shift and a mask, both exact), and each half meets the matching half of the query:
//   scores: four key rows side by side (a chain of FMAs per row and head, four rows interleaved to
//           cover the FMA latency), reduced four at a time with horizontal adds, then scaled;
//   softmax: a branch-free exp (degree-6 Taylor polynomial), eight lanes at a time;
//   values: the head dimension in slices of 32 elements, the accumulators of every query head
//           of a slice in registers, over blocks of 64 rows so that the block's rows, read from
//           memory by the first slice, come from L1 for the others.
// Same contract as decode_attention (brecq/kernels.h); taken for bfloat16 without a key mask and
// head_dim a multiple of 32 up to 256, else the portable kernel runs.
#include <cmath>
#include <cstdint>
#include <vector>

#include "attention_items.h"
#include "brecq/kernels.h"
#include "gemv.h"
#include "numeric.h"

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace brecq {
namespace detail {
namespace {

constexpr int64_t kMaxDim = 256;          // head_dim, in 16-element chunks: up to 16 of them
constexpr int64_t kMaxGroup = 16;         // query heads per key/value head held here
constexpr int64_t kValueBlockRows = 64;   // value rows per block: 64 x 512 bytes at head_dim 256
constexpr int kHeadsPerPass = 2;          // query heads whose value accumulators share the registers

// e^x for x <= 0, eight at a time: 2^(x log2 e) split into 2^n, built in the exponent bits, and
// 2^f with |f| <= 1/2, a degree-6 Taylor polynomial of e^(f ln 2) (about one float32 ulp); inputs
// under -87 give e^-87.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.693147180559945309f));
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// 16 bfloat16 values as float32: their even elements (0, 2, ..., 14) and their odd ones.
inline __m256 even_half(__m256i pair) { return _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16)); }
inline __m256 odd_half(__m256i pair) {
  return _mm256_castsi256_ps(_mm256_and_si256(pair, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
inline __m256i load16(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// The four lane sums of a, b, c, d, in that order.
inline __m128 sums4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // per 128-bit half: a, b, c, d partial sums
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// Key and value rows are requested this many rows ahead of use, as in attention_avx512.cpp. On the
// session-15 VM (Emerald Rapids, BRECQ_CPU_ISA=avx2; `brecq_attention_bench`, alternating builds):
// 28 layers at 2048 tokens from memory 16.9-19.9 -> 13.3-15.0 ms (70-76 % -> 89-93 % of a plain
// read, 3 rounds), 28 at 512 tokens 4.0 -> 3.05 ms, one layer in cache 258-278 -> 232-242 us (2
// rounds). Requests past a head's last row read nothing the kernel uses and cannot fault.
constexpr int64_t kAheadRows = 16;

// Requests the `bytes` of a cache row.
inline void prefetch_row(const uint16_t* row, int64_t bytes) {
  for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch(reinterpret_cast<const char*>(row) + at, 0, 3);
}

struct Scratch {
  std::vector<float> query;   // [group][chunks][even 8, odd 8]
  std::vector<float> scores;  // [group][kv_len rounded up to 8]
  std::vector<float> acc;     // [group][head_dim]
};

// Scores of key rows [at, at + 4) (rows past kv_len repeat the last one; their scores are unused)
// for query heads [j0, j0 + H).
template <int H>
void scores4(const uint16_t* k, int64_t at, int64_t kv_len, int64_t k_stride_l, int64_t chunks, const float* query,
             int64_t j0, float scale, float* scores, int64_t padded) {
  const uint16_t* row[4];
  for (int i = 0; i < 4; ++i) {
    row[i] = k + (at + i < kv_len ? at + i : kv_len - 1) * k_stride_l;
    if (j0 == 0) prefetch_row(row[i] + kAheadRows * k_stride_l, 32 * chunks);
  }
  __m256 sum[H][4];
  for (int j = 0; j < H; ++j)
    for (int i = 0; i < 4; ++i) sum[j][i] = _mm256_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    __m256 even[4], odd[4];
    for (int i = 0; i < 4; ++i) {
      const __m256i pair = load16(row[i] + 16 * c);
      even[i] = even_half(pair);
      odd[i] = odd_half(pair);
    }
    for (int j = 0; j < H; ++j) {
      const float* qj = query + ((j0 + j) * chunks + c) * 16;
      const __m256 q_even = _mm256_loadu_ps(qj), q_odd = _mm256_loadu_ps(qj + 8);
      for (int i = 0; i < 4; ++i) {
        sum[j][i] = _mm256_fmadd_ps(even[i], q_even, sum[j][i]);
        sum[j][i] = _mm256_fmadd_ps(odd[i], q_odd, sum[j][i]);
      }
    }
  }
  for (int j = 0; j < H; ++j)
    _mm_storeu_ps(scores + (j0 + j) * padded + at,
                  _mm_mul_ps(sums4(sum[j][0], sum[j][1], sum[j][2], sum[j][3]), _mm_set1_ps(scale)));
}

// acc[j][slice] += sum over rows [first, last) of p_j[l] * v[l][slice] for the 32-element slice
// starting at column s and query heads [j0, j0 + H); acc keeps even and odd elements apart.
template <int H>
void values_slice(const uint16_t* v, int64_t first, int64_t last, int64_t v_stride_l, int64_t s, const float* scores,
                  int64_t padded, int64_t j0, float* acc, int64_t d) {
  __m256 sum[H][4];
  for (int j = 0; j < H; ++j)
    for (int a = 0; a < 4; ++a) sum[j][a] = _mm256_loadu_ps(acc + (j0 + j) * d + s + 8 * a);
  for (int64_t l = first; l < last; ++l) {
    const uint16_t* row = v + l * v_stride_l + s;
    if (s == 0 && j0 == 0) prefetch_row(row + kAheadRows * v_stride_l, 2 * d);  // later slices find the row in cache
    const __m256i lo = load16(row), hi = load16(row + 16);
    const __m256 part[4] = {even_half(lo), odd_half(lo), even_half(hi), odd_half(hi)};
    for (int j = 0; j < H; ++j) {
      const __m256 p = _mm256_broadcast_ss(scores + (j0 + j) * padded + l);
      for (int a = 0; a < 4; ++a) sum[j][a] = _mm256_fmadd_ps(p, part[a], sum[j][a]);
    }
  }
  for (int j = 0; j < H; ++j)
    for (int a = 0; a < 4; ++a) _mm256_storeu_ps(acc + (j0 + j) * d + s + 8 * a, sum[j][a]);
}

void attend_item(const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t group, int64_t kv_len, int64_t d,
                 int64_t k_stride_l, int64_t v_stride_l, float scale, uint16_t* out, Scratch& scratch) {
  const int64_t chunks = d / 16;
  const int64_t padded = (kv_len + 7) / 8 * 8;
  scratch.query.resize(group * d);
  scratch.scores.resize(group * padded);
  scratch.acc.resize(group * d);
  float* query = scratch.query.data();
  float* scores = scratch.scores.data();
  float* acc = scratch.acc.data();

  // The query heads split like the cache rows: per 16-element chunk, 8 even then 8 odd elements.
  for (int64_t j = 0; j < group; ++j)
    for (int64_t c = 0; c < chunks; ++c) {
      const __m256i pair = load16(q + j * d + 16 * c);
      _mm256_storeu_ps(query + (j * chunks + c) * 16, even_half(pair));
      _mm256_storeu_ps(query + (j * chunks + c) * 16 + 8, odd_half(pair));
    }

  for (int64_t at = 0; at < kv_len; at += 4)
    for (int64_t j0 = 0; j0 < group; j0 += kHeadsPerPass) {
      if (group - j0 >= 2) scores4<2>(k, at, kv_len, k_stride_l, chunks, query, j0, scale, scores, padded);
      else scores4<1>(k, at, kv_len, k_stride_l, chunks, query, j0, scale, scores, padded);
    }

  // Softmax of each head's scores; the padding past kv_len gets weight 0.
  float inverse_sum[kMaxGroup];
  for (int64_t j = 0; j < group; ++j) {
    float* sj = scores + j * padded;
    for (int64_t i = kv_len; i < padded; ++i) sj[i] = -INFINITY;
    __m256 top = _mm256_set1_ps(-INFINITY);
    for (int64_t at = 0; at < padded; at += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(sj + at));
    __m128 half = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    half = _mm_max_ps(half, _mm_movehl_ps(half, half));
    half = _mm_max_ss(half, _mm_movehdup_ps(half));
    const __m256 max = _mm256_set1_ps(_mm_cvtss_f32(half));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t at = 0; at < padded; at += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(sj + at), max));
      _mm256_storeu_ps(sj + at, e);
      sum = _mm256_add_ps(sum, e);
    }
    // The padding's weights, e^-87 each (exp_nonpositive's clamp), are below 1e-37 against a sum
    // of at least 1 (the maximum's own e^0): they leave the float32 sum as it is; zeroed here so
    // that nothing reads them.
    for (int64_t i = kv_len; i < padded; ++i) sj[i] = 0.0f;
    float lanes[8];
    _mm256_storeu_ps(lanes, sum);
    float total = 0.0f;
    for (int i = 0; i < 8; ++i) total += lanes[i];
    inverse_sum[j] = 1.0f / total;
  }

  for (int64_t i = 0; i < group * d; ++i) acc[i] = 0.0f;
  for (int64_t first = 0; first < kv_len; first += kValueBlockRows) {
    const int64_t last = first + kValueBlockRows < kv_len ? first + kValueBlockRows : kv_len;
    for (int64_t s = 0; s < d; s += 32)
      for (int64_t j0 = 0; j0 < group; j0 += kHeadsPerPass) {
        if (group - j0 >= 2) values_slice<2>(v, first, last, v_stride_l, s, scores, padded, j0, acc, d);
        else values_slice<1>(v, first, last, v_stride_l, s, scores, padded, j0, acc, d);
      }
  }

  // acc holds, per 32-element slice, the even elements of its first 16, their odd ones, then the
  // same for its second 16: put them back in order, scaled, as bfloat16.
  for (int64_t j = 0; j < group; ++j)
    for (int64_t c = 0; c < chunks; ++c) {
      const float* even = acc + j * d + 16 * c;
      const float* odd = even + 8;
      uint16_t* o = out + j * d + 16 * c;
      for (int i = 0; i < 8; ++i) {
        o[2 * i] = numeric::f32_to_bf16(even[i] * inverse_sum[j]);
        o[2 * i + 1] = numeric::f32_to_bf16(odd[i] * inverse_sum[j]);
      }
    }
}

}  // namespace

bool decode_attention_avx2(const void* q, const void* k, const void* v, const uint8_t* key_mask, bool bf16,
                           int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t kv_len, int64_t head_dim,
                           int64_t k_stride_b, int64_t k_stride_h, int64_t k_stride_l, int64_t v_stride_b,
                           int64_t v_stride_h, int64_t v_stride_l, float scale, void* out, int threads) {
  const int64_t group = q_heads / kv_heads;
  if (!bf16 || key_mask || kv_len < 1 || head_dim % 32 || head_dim > kMaxDim || group > kMaxGroup) return false;
  attend_bf16_items<Scratch>(attend_item, q, k, v, batch, q_heads, kv_heads, kv_len, head_dim, k_stride_b, k_stride_h,
                             k_stride_l, v_stride_b, v_stride_h, v_stride_l, scale, out, threads);
  return true;
}

}  // namespace detail
}  // namespace brecq

#else
namespace brecq {
namespace detail {
bool decode_attention_avx2(const void*, const void*, const void*, const uint8_t*, bool, int64_t, int64_t, int64_t,
                           int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, void*, int) {
  return false;
}
}  // namespace detail
}  // namespace brecq
#endif
