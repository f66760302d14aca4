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

}  // namespace numeric
}  // namespace brecq
