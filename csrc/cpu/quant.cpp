// Grouped asymmetric quantization: parameters, quantize, dequantize, fake-quantize.
// Every formula here is mirrored operation for operation by brecq_ext/reference.py; the build uses
// -ffp-contract=off so that the compiler does not fuse multiply-adds and the results stay
// bit-identical to the reference.
#include <algorithm>
#include <cmath>
#include <limits>

#include "brecq/format.h"
#include "brecq/kernels.h"
#include "group_loop.h"
#include "numeric.h"

namespace brecq {
namespace {

constexpr float kMinScale = 5.9604644775390625e-08f;  // smallest float16 subnormal, 2^-24
constexpr float kMaxScale = 65504.0f;                  // largest finite float16

// float16 scale that is >= s (so that qmax * scale still covers the range after rounding).
inline uint16_t scale_round_up(float s) {
  s = std::min(std::max(s, kMinScale), kMaxScale);
  uint16_t h = numeric::f32_to_f16(s);
  if (numeric::f16_to_f32(h) < s) h = static_cast<uint16_t>(h + 1);
  return h;
}

struct GroupParams {
  uint16_t scale_bits;
  float scale;
  float zero;
};

inline GroupParams params_for_range(float lo, float hi, int qmax) {
  GroupParams p;
  p.scale_bits = scale_round_up((hi - lo) / static_cast<float>(qmax));
  p.scale = numeric::f16_to_f32(p.scale_bits);
  float z = __builtin_rintf(-lo / p.scale);
  p.zero = std::min(std::max(z, 0.0f), static_cast<float>(qmax));
  return p;
}

inline float quantize_one(float w, float scale, float zero, float qmax) {
  float q = __builtin_rintf(w / scale) + zero;
  return std::min(std::max(q, 0.0f), qmax);
}

float group_squared_error(const float* w, int64_t len, const GroupParams& p, float qmax) {
  float err = 0.0f;
  for (int64_t i = 0; i < len; ++i) {
    const float q = quantize_one(w[i], p.scale, p.zero, qmax);
    const float d = w[i] - (q - p.zero) * p.scale;
    err += d * d;
  }
  return err;
}

}  // namespace

void quant_params(const float* w, int64_t n, int64_t k, int bits, int64_t g, int search_steps,
                  uint16_t* scale, uint8_t* zero, int threads) {
  const int64_t groups = num_groups(k, g);
  const int qmax = max_code(bits);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t row = 0; row < n; ++row) {
    for (int64_t grp = 0; grp < groups; ++grp) {
      const float* wg = w + row * k + grp * g;
      const int64_t len = std::min(g, k - grp * g);
      float lo = 0.0f, hi = 0.0f;
      for (int64_t i = 0; i < len; ++i) {
        lo = std::min(lo, wg[i]);
        hi = std::max(hi, wg[i]);
      }
      GroupParams best = params_for_range(lo, hi, qmax);
      if (search_steps > 0) {
        float best_err = std::numeric_limits<float>::infinity();
        for (int step = 0; step < search_steps; ++step) {
          const float factor = 1.0f - 0.01f * static_cast<float>(step);
          const GroupParams cand = params_for_range(lo * factor, hi * factor, qmax);
          const float err = group_squared_error(wg, len, cand, static_cast<float>(qmax));
          if (err < best_err) {
            best_err = err;
            best = cand;
          }
        }
      }
      scale[row * groups + grp] = best.scale_bits;
      zero[row * groups + grp] = static_cast<uint8_t>(best.zero);
    }
  }
}

void quantize(const float* w, const uint16_t* scale, const uint8_t* zero, int64_t n, int64_t k,
              int bits, int64_t g, uint8_t* codes, int threads) {
  const float qmax = static_cast<float>(max_code(bits));
  detail::for_each_group(n, k, g, scale, zero, threads, [&](int64_t begin, int64_t end, float s, float z) {
    for (int64_t i = begin; i < end; ++i) codes[i] = static_cast<uint8_t>(quantize_one(w[i], s, z, qmax));
  });
}

void dequantize(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, int64_t n,
                int64_t k, int64_t g, float* out, int threads) {
  detail::for_each_group(n, k, g, scale, zero, threads, [&](int64_t begin, int64_t end, float s, float z) {
    for (int64_t i = begin; i < end; ++i) out[i] = (static_cast<float>(codes[i]) - z) * s;
  });
}

void fake_quantize(const float* w, const uint16_t* scale, const uint8_t* zero, int64_t n, int64_t k,
                   int bits, int64_t g, float* out, int threads) {
  const float qmax = static_cast<float>(max_code(bits));
  detail::for_each_group(n, k, g, scale, zero, threads, [&](int64_t begin, int64_t end, float s, float z) {
    for (int64_t i = begin; i < end; ++i) out[i] = (quantize_one(w[i], s, z, qmax) - z) * s;
  });
}

}  // namespace brecq
