// Parallel loop over the (row, group) pairs of a grouped [n, k] tensor, shared by the elementwise
// kernels: body(begin, end, scale, zero) handles elements [begin, end) of one group.
#pragma once
#include <algorithm>
#include <cstdint>

#include "brecq/format.h"
#include "numeric.h"

namespace brecq {
namespace detail {

template <typename Body>
inline void for_each_group(int64_t n, int64_t k, int64_t g, const uint16_t* scale, const uint8_t* zero,
                           int threads, Body body) {
  const int64_t groups = num_groups(k, g);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t row = 0; row < n; ++row) {
    for (int64_t grp = 0; grp < groups; ++grp) {
      const float s = numeric::f16_to_f32(scale[row * groups + grp]);
      const float z = static_cast<float>(zero[row * groups + grp]);
      const int64_t begin = row * k + grp * g;
      const int64_t end = row * k + std::min(k, grp * g + g);
      body(begin, end, s, z);
    }
  }
}

}  // namespace detail
}  // namespace brecq
