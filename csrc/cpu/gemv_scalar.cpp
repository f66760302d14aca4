// Portable GEMV for every bit width and group size (unpack one weight row, then dot products), and
// for TILE16 weights (4, 6 and 8 bits).
#include <algorithm>
#include <vector>

#include "brecq/format.h"
#include "brecq/kernels.h"
#include "gemv.h"
#include "numeric.h"

namespace brecq {
namespace detail {

void gemv_scalar(const GemvProblem& p) {
  for_each_index(p.n, p.threads, [&](int64_t row) {
    static thread_local std::vector<uint8_t> codes;
    if (codes.size() < static_cast<size_t>(p.k_padded)) codes.resize(static_cast<size_t>(p.k_padded));
    {
      unpack_row(p.packed + row * p.row_bytes, p.k, p.bits, codes.data());
      for (int64_t r = 0; r < p.m; ++r) {
        const float* x = p.x + r * p.k_padded;
        float total = 0.0f, correction = 0.0f;
        for (int64_t grp = 0; grp < p.groups; ++grp) {
          const float s = numeric::f16_to_f32(p.scale[row * p.groups + grp]);
          const float z = static_cast<float>(p.zero[row * p.groups + grp]);
          const int64_t end = std::min(p.k, grp * p.g + p.g);
          float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
          for (int64_t i = grp * p.g; i < end; ++i) acc += x[i] * static_cast<float>(codes[i]);
          total += s * acc;
          correction += s * z * p.xsum[r * p.groups + grp];
        }
        p.store(r * p.n + row, total - correction + (p.bias ? p.bias[row] : 0.0f));
      }
    }
  });
}

void tiled_gemv_scalar(const GemvProblem& p) {
  const int64_t tile_bytes = tile_code_bytes(p.k, p.g, p.bits);
  for_each_index(p.n, p.threads, [&](int64_t row) {
    const int64_t tile = row / kTileRows, lane = row % kTileRows;
    const uint8_t* tile_codes = p.packed + tile * tile_bytes;
    for (int64_t r = 0; r < p.m; ++r) {
      const float* x = p.x + r * p.k_padded;
      float total = 0.0f, correction = 0.0f;
      for (int64_t grp = 0; grp < p.groups; ++grp) {
        const int64_t param = (tile * p.groups + grp) * kTileRows + lane;
        float acc = 0.0f;
        for (int64_t i = grp * p.g; i < grp * p.g + p.g; ++i)
          acc += x[i] * static_cast<float>(tile16_code(tile_codes, p.bits, lane, i));
        const float s = numeric::f16_to_f32(p.scale[param]);
        total += s * acc;
        correction += s * static_cast<float>(p.zero[param]) * p.xsum[r * p.groups + grp];
      }
      p.store(r * p.n + row, total - correction + (p.bias ? p.bias[row] : 0.0f));
    }
  });
}

}  // namespace detail
}  // namespace brecq
