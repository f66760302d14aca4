// Scalar conversions shared by the CPU kernels. `static` on purpose: the per-ISA translation units
// compile these under different target options, and internal linkage keeps each copy private.
// Written out in software (not F16C) so that the
// generic kernels stay portable and round exactly as torch does (round-to-nearest-even).
#pragma once
#include <cstdint>
#include <cstring>

namespace brecq {
namespace numeric {

static inline float bits_to_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24 is exact in float32
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits_to_f32(sign | 0x7f800000u | (mantissa << 13));
  return bits_to_f32(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// Round to nearest even, as torch's float -> half conversion.
static inline uint16_t f32_to_f16(float f) {
  uint32_t x = f32_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // rounds to infinity
  if (x < 0x38800000u) {
    // Subnormal half: adding 0.5 puts the half ulp (2^-24) in the float's last mantissa bit, so
    // the FPU performs the round-to-nearest-even for us.
    const float shifted = bits_to_f32(x) + 0.5f;
    return sign | static_cast<uint16_t>(f32_to_bits(shifted) - 0x3f000000u);
  }
  const uint32_t odd = (x >> 13) & 1u;
  x += 0xc8000fffu + odd;  // rebias exponent by -112 and round half to even
  return sign | static_cast<uint16_t>(x >> 13);
}

// bfloat16 <-> float32 (round to nearest even; NaN stays NaN).
static inline float bf16_to_f32(uint16_t b) { return bits_to_f32(static_cast<uint32_t>(b) << 16); }
static inline uint16_t f32_to_bf16(float f) {
  const uint32_t x = f32_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// e^x for the kernels' elementwise loops (SiLU, softmax), written so that gcc vectorizes a loop
// of it at the AVX2 baseline (std::exp keeps a loop scalar: SiLU's 3072 calls a layer were a third
// of a decode step's time between kernels). x = n ln 2 + r with |r| <= ln 2 / 2, e^r by Cephes'
// expf polynomial, 2^n put into the exponent bits: within 1 ulp of e^x on [-86, 88.72] (every third
// float32 there checked against double std::exp: 0.98 ulp at worst), +inf above, where e^x
// overflows float32, and 0 below -86 (where 1 + e^x is 1 in float32, and a softmax weight is far
// below its sum's resolution). NaN stays NaN. No branches: out-of-range x runs the same arithmetic
// on garbage and is replaced at the end by a select on the bits (clamping x first, or a select on
// floats, let gcc 12 fold a constant path into a branch that kept the loop scalar).
static inline float exp_branchless(float x) {
  // n = x log2(e) rounded to nearest by adding 1.5 * 2^23 (the float's last place is then 1),
  // which also leaves n in the sum's low mantissa bits (std::floor and float -> int conversion
  // are not vectorized without -ffast-math).
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const uint32_t n_bits = f32_to_bits(shifted) - 0x4b400000u;  // n mod 2^32
  // ln 2 split in two so that n * high is exact: r carries about 32 bits of ln 2 in all.
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // 2^(n - 1) is a normal float for every n in range (-124 to 128); the factor 2 restores it.
  const float scale = bits_to_f32((n_bits + 126u) << 23);
  const uint32_t overflow = 0u - static_cast<uint32_t>(x > 88.72283935546875f);
  const uint32_t underflow = 0u - static_cast<uint32_t>(x < -86.0f);
  const uint32_t result = f32_to_bits(p * scale * 2.0f);
  return bits_to_f32((result & ~(overflow | underflow)) | (0x7f800000u & overflow));
}

// f(x[i]) summed over n floats in eight interleaved running sums. One running sum is a chain of
// dependent adds (3-4 cycles each): about 1 us per 1024 inputs, and gcc keeps it scalar without
// -ffast-math (even under `omp simd reduction` in the decoder's RMSNorm, though it vectorizes the
// same loop in a function of its own). The order of the adds is fixed, so results do not depend
// on the ISA.
template <class F>
static inline float sum_in_eight_lanes(const float* x, int64_t n, F f) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lanes[j] += f(x[i + j]);
  float tail = 0.0f;
  for (; i < n; ++i) tail += f(x[i]);
  return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail;
}

// The zero-point correction's group sums (gemv.cpp).
static inline float sum(const float* x, int64_t n) {
  return sum_in_eight_lanes(x, n, [](float v) { return v; });
}

// RMSNorm's sum of squares (decoder.cpp). With the decoder's scalar loop its whole RMSNorm of a
// 128-wide head took 0.18 us and of the 1024-wide hidden state 1.26 us, against 0.09 and 0.57
// this way (a scratch copy of norm_rows, one thread, data in L1).
static inline float sum_of_squares(const float* x, int64_t n) {
  return sum_in_eight_lanes(x, n, [](float v) { return v * v; });
}

}  // namespace numeric
}  // namespace brecq
