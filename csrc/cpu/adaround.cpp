// AdaRound soft rounding (Nagel et al., 2020): the hot path of BRECQ's reconstruction loop.
// Mirrors brecq_ext/reference.py; gradients follow torch autograd's conventions for clamp
// (gradient passes where min <= x <= max, bounds included).
#include <algorithm>
#include <cmath>

#include "brecq/format.h"
#include "brecq/kernels.h"
#include "group_loop.h"
#include "numeric.h"

namespace brecq {
namespace {

constexpr float kZeta = 1.1f;
constexpr float kGamma = -0.1f;

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

inline float rectified(float sig) {
  return std::min(std::max(sig * (kZeta - kGamma) + kGamma, 0.0f), 1.0f);
}

// d h / d V, zero where the rectifying clamp is active (bounds pass, as in torch.clamp).
inline float rectified_grad(float sig) {
  const float pre = sig * (kZeta - kGamma) + kGamma;
  if (pre < 0.0f || pre > 1.0f) return 0.0f;
  return (kZeta - kGamma) * sig * (1.0f - sig);
}

}  // namespace

void adaround_forward(const float* w, const float* v, const uint16_t* scale, const uint8_t* zero,
                      int64_t n, int64_t k, int bits, int64_t g, float* w_soft, int threads) {
  const float qmax = static_cast<float>(max_code(bits));
  detail::for_each_group(n, k, g, scale, zero, threads, [&](int64_t begin, int64_t end, float s, float z) {
    for (int64_t i = begin; i < end; ++i) {
      const float q = std::floor(w[i] / s) + rectified(sigmoid(v[i])) + z;
      w_soft[i] = (std::min(std::max(q, 0.0f), qmax) - z) * s;
    }
  });
}

void adaround_backward(const float* grad_out, const float* w, const float* v, const uint16_t* scale,
                       const uint8_t* zero, int64_t n, int64_t k, int bits, int64_t g, float* grad_v,
                       int threads) {
  const float qmax = static_cast<float>(max_code(bits));
  detail::for_each_group(n, k, g, scale, zero, threads, [&](int64_t begin, int64_t end, float s, float z) {
    for (int64_t i = begin; i < end; ++i) {
      const float sig = sigmoid(v[i]);
      const float q = std::floor(w[i] / s) + rectified(sig) + z;
      const bool passes = q >= 0.0f && q <= qmax;
      grad_v[i] = passes ? grad_out[i] * s * rectified_grad(sig) : 0.0f;
    }
  });
}

double adaround_regularizer(const float* v, int64_t count, float beta, float* grad_v, int threads) {
  double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total) num_threads(threads)
  for (int64_t i = 0; i < count; ++i) {
    const float sig = sigmoid(v[i]);
    const float centred = 2.0f * rectified(sig) - 1.0f;
    const float magnitude = std::fabs(centred);
    total += static_cast<double>(1.0f - std::pow(magnitude, beta));
    // d/dV (1 - |2h - 1|^beta) = -beta |2h - 1|^(beta - 1) sign(2h - 1) * 2 h'(V)
    const float dpow = magnitude > 0.0f ? beta * std::pow(magnitude, beta - 1.0f) : 0.0f;
    const float sign = centred > 0.0f ? 1.0f : (centred < 0.0f ? -1.0f : 0.0f);
    grad_v[i] = -dpow * sign * 2.0f * rectified_grad(sig);
  }
  return total;
}

}  // namespace brecq
