// The work loop of the bfloat16 decode-attention kernels (attention_avx512.cpp, attention_avx2.cpp):
// one item per (batch row, key/value head), so that the item's query heads share every cache row
// read; the items are shared out among the calling team inside the decoder's step-long region
// (detail::in_split_team), or among a region of their own otherwise.
#pragma once

#include <cstdint>

#include "gemv.h"

namespace brecq {
namespace detail {

// attend_item(q, k, v, group, kv_len, head_dim, k_stride_l, v_stride_l, scale, out, scratch) computes
// one item: q and out at its first query head, k and v at its key/value head; Scratch is the
// kernel's per-thread state, kept from call to call.
template <typename Scratch, typename AttendItem>
void attend_bf16_items(AttendItem attend_item, const void* q, const void* k, const void* v, int64_t batch,
                       int64_t q_heads, int64_t kv_heads, int64_t kv_len, int64_t head_dim, int64_t k_stride_b,
                       int64_t k_stride_h, int64_t k_stride_l, int64_t v_stride_b, int64_t v_stride_h,
                       int64_t v_stride_l, float scale, void* out, int threads) {
  const int64_t group = q_heads / kv_heads;
  const int64_t items = batch * kv_heads;
  const uint16_t* qb = static_cast<const uint16_t*>(q);
  const uint16_t* kb = static_cast<const uint16_t*>(k);
  const uint16_t* vb = static_cast<const uint16_t*>(v);
  uint16_t* ob = static_cast<uint16_t*>(out);
  auto attend_one = [&](int64_t item) {
    static thread_local Scratch scratch;
    const int64_t b = item / kv_heads, h = item % kv_heads;
    const int64_t first_head = b * q_heads + h * group;  // repeat_kv's order
    attend_item(qb + first_head * head_dim, kb + b * k_stride_b + h * k_stride_h,
                vb + b * v_stride_b + h * v_stride_h, group, kv_len, head_dim, k_stride_l, v_stride_l, scale,
                ob + first_head * head_dim, scratch);
  };
  auto attend = [&] {
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) attend_one(item);
  };
  if (in_split_team()) {
    attend();
  } else if (threads <= 1 || items <= 1) {  // on the calling thread, with no region of its own
    for (int64_t item = 0; item < items; ++item) attend_one(item);
  } else {
#pragma omp parallel num_threads(threads > items ? static_cast<int>(items) : threads)
    attend();
  }
}

}  // namespace detail
}  // namespace brecq
