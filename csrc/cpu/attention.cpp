// One-token (decode) attention over a key/value cache, grouped-query aware.
//
// torch's CPU scaled_dot_product_attention spends ~95 us per layer on a Qwen3-0.6B decode step's
// bfloat16 16 x 48-token attention and grows to ~1.7 ms at 1000 cached tokens (torch 2.13, 2 threads), while
// the work is a few hundred thousand multiply-adds, or one read of the cache. Here each thread takes
// whole (batch row, key/value head) pairs, so every cached key and value is read once for all the
// query heads that share it, in two passes (scores, then the weighted sum of values).
//
// Portable C++ written so that GCC vectorises the inner loops at the build's baseline (AVX2 on
// x86-64): simd reductions over the head dimension, and a branch-free exp (numeric::exp_branchless).
#include <cmath>
#include <cstdint>
#include <vector>

#include "brecq/kernels.h"
#include "gemv.h"
#include "numeric.h"

namespace brecq {
namespace {

inline void to_float(const void* src, bool bf16, int64_t count, float* dst) {
  if (bf16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) dst[i] = numeric::bits_to_f32(static_cast<uint32_t>(s[i]) << 16);
  } else {
    const float* s = static_cast<const float*>(src);
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) dst[i] = s[i];
  }
}

inline const void* element(const void* base, bool bf16, int64_t offset) {
  return static_cast<const char*>(base) + offset * (bf16 ? 2 : 4);
}

struct Scratch {  // per thread, grown as needed: no allocation per call once warm
  std::vector<float> query, rows, scores, acc;
  std::vector<int64_t> keys;
};

constexpr int64_t kKeysPerStep = 4;  // keys per pass over the head dimension: 4 independent sums

// The cache rows of one step, widened to float32 into rows [kKeysPerStep][d] one after another.
// (Reading the rows in place side by side instead ran float32 caches from memory at half the rate.)
inline void load_step(const void* base, bool bf16, const int64_t* step_keys, int64_t stride, int64_t d, float* rows) {
  for (int64_t r = 0; r < kKeysPerStep; ++r) to_float(element(base, bf16, step_keys[r] * stride), bf16, d, rows + r * d);
}

}  // namespace

namespace detail {
// attention_avx512.cpp: bfloat16 caches without a mask; false where it does not apply.
bool decode_attention_avx512(const void* q, const void* k, const void* v, const uint8_t* key_mask, bool bf16,
                             int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t kv_len, int64_t head_dim,
                             int64_t k_stride_b, int64_t k_stride_h, int64_t k_stride_l, int64_t v_stride_b,
                             int64_t v_stride_h, int64_t v_stride_l, float scale, void* out, int threads);
// attention_avx2.cpp: the same cases with AVX2 and FMA.
bool decode_attention_avx2(const void* q, const void* k, const void* v, const uint8_t* key_mask, bool bf16,
                           int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t kv_len, int64_t head_dim,
                           int64_t k_stride_b, int64_t k_stride_h, int64_t k_stride_l, int64_t v_stride_b,
                           int64_t v_stride_h, int64_t v_stride_l, float scale, void* out, int threads);
}  // namespace detail

void decode_attention(const void* q, const void* k, const void* v, const uint8_t* key_mask, bool bf16,
                      int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t kv_len, int64_t head_dim,
                      int64_t k_stride_b, int64_t k_stride_h, int64_t k_stride_l, int64_t v_stride_b,
                      int64_t v_stride_h, int64_t v_stride_l, int64_t mask_stride_b, float scale, void* out,
                      int threads) {
  const Isa isa = active_isa();
  if (isa >= Isa::kAvx512Vnni &&
      detail::decode_attention_avx512(q, k, v, key_mask, bf16, batch, q_heads, kv_heads, kv_len, head_dim, k_stride_b,
                                      k_stride_h, k_stride_l, v_stride_b, v_stride_h, v_stride_l, scale, out, threads))
    return;
  if (isa >= Isa::kAvx2 &&
      detail::decode_attention_avx2(q, k, v, key_mask, bf16, batch, q_heads, kv_heads, kv_len, head_dim, k_stride_b,
                                    k_stride_h, k_stride_l, v_stride_b, v_stride_h, v_stride_l, scale, out, threads))
    return;
  const int64_t group = q_heads / kv_heads;
  const int64_t items = batch * kv_heads;
  const int64_t d = head_dim;
  // Inside the decoder's step-long region (detail::in_split_team) the calling team shares out the
  // items (the omp for below binds to it); one thread asked for runs them itself; anywhere else the
  // call forks a region of its own.
  auto attend_one = [&](int64_t item) {
    static thread_local Scratch scratch;
    scratch.query.resize(group * d);
    scratch.rows.resize(kKeysPerStep * d);
    scratch.scores.resize(group * (kv_len + kKeysPerStep));
    scratch.acc.resize(group * d);
    scratch.keys.resize(kv_len + kKeysPerStep);
    float* query = scratch.query.data();
    float* rows = scratch.rows.data();
    float* acc = scratch.acc.data();
    int64_t* keys = scratch.keys.data();
    {
      const int64_t b = item / kv_heads, h = item % kv_heads;
      // The visible keys, in order; a static cache hides its unused tail, which is then never read.
      int64_t count = 0;
      const uint8_t* visible = key_mask ? key_mask + b * mask_stride_b : nullptr;
      for (int64_t l = 0; l < kv_len; ++l)
        if (!visible || visible[l]) keys[count++] = l;
      const int64_t padded = (count + kKeysPerStep - 1) / kKeysPerStep * kKeysPerStep;
      for (int64_t i = count; i < padded; ++i) keys[i] = keys[0];  // padding, weighted 0 below
      float* scores = scratch.scores.data();  // [group][padded]

      const int64_t first_head = b * q_heads + h * group;  // repeat_kv's order: head h*group+j reads kv head h
      to_float(element(q, bf16, first_head * d), bf16, group * d, query);
      for (int64_t i = 0; i < group * d; ++i) query[i] *= scale;

      const void* k_base = element(k, bf16, b * k_stride_b + h * k_stride_h);
      for (int64_t at = 0; at < padded; at += kKeysPerStep) {
        load_step(k_base, bf16, keys + at, k_stride_l, d, rows);
        const float *r0 = rows, *r1 = rows + d, *r2 = rows + 2 * d, *r3 = rows + 3 * d;
        for (int64_t j = 0; j < group; ++j) {
          const float* qj = query + j * d;
          float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
          for (int64_t i = 0; i < d; ++i) {
            s0 += qj[i] * r0[i];
            s1 += qj[i] * r1[i];
            s2 += qj[i] * r2[i];
            s3 += qj[i] * r3[i];
          }
          float* sj = scores + j * padded + at;
          sj[0] = s0, sj[1] = s1, sj[2] = s2, sj[3] = s3;
        }
      }

      float inverse_sum[kMaxDecodeGroup];  // group <= kMaxDecodeGroup: checked by the Python layer
      for (int64_t j = 0; j < group; ++j) {
        float* sj = scores + j * padded;
        float top = -INFINITY;
        for (int64_t i = 0; i < count; ++i) top = sj[i] > top ? sj[i] : top;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < count; ++i) {
          sj[i] = numeric::exp_branchless(sj[i] - top);  // x <= 0
          sum += sj[i];
        }
        for (int64_t i = count; i < padded; ++i) sj[i] = 0.0f;
        inverse_sum[j] = count > 0 ? 1.0f / sum : 0.0f;  // no visible key: the output row is 0
      }

      for (int64_t i = 0; i < group * d; ++i) acc[i] = 0.0f;
      const void* v_base = element(v, bf16, b * v_stride_b + h * v_stride_h);
      for (int64_t at = 0; at < padded; at += kKeysPerStep) {
        load_step(v_base, bf16, keys + at, v_stride_l, d, rows);
        const float *r0 = rows, *r1 = rows + d, *r2 = rows + 2 * d, *r3 = rows + 3 * d;
        for (int64_t j = 0; j < group; ++j) {
          const float* pj = scores + j * padded + at;
          const float p0 = pj[0], p1 = pj[1], p2 = pj[2], p3 = pj[3];
          float* aj = acc + j * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) aj[i] += (p0 * r0[i] + p1 * r1[i]) + (p2 * r2[i] + p3 * r3[i]);
        }
      }

      for (int64_t j = 0; j < group; ++j) {
        const int64_t at = (first_head + j) * d;
        const float* aj = acc + j * d;
        if (bf16) {
          uint16_t* o = static_cast<uint16_t*>(out) + at;
          for (int64_t i = 0; i < d; ++i) o[i] = numeric::f32_to_bf16(aj[i] * inverse_sum[j]);
        } else {
          float* o = static_cast<float*>(out) + at;
          for (int64_t i = 0; i < d; ++i) o[i] = aj[i] * inverse_sum[j];
        }
      }
    }
  };
  auto attend = [&] {
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) attend_one(item);
  };
  if (detail::in_split_team()) {
    attend();
  } else if (threads <= 1 || items <= 1) {  // on the calling thread, with no region of its own
    for (int64_t item = 0; item < items; ++item) attend_one(item);
  } else {
#pragma omp parallel num_threads(threads > items ? static_cast<int>(items) : threads)
    attend();
  }
}

}  // namespace brecq
