// Standalone checks of the CPU kernels against straightforward scalar formulas (no torch).
// Exit status is the number of failed checks.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "brecq/format.h"
#include "brecq/kernels.h"
#include "numeric.h"

namespace {

int failures = 0;
#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      ++failures;                                          \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);     \
      std::printf(__VA_ARGS__);                            \
      std::printf("\n");                                   \
    }                                                      \
  } while (0)

using namespace brecq;

void test_half_conversions() {
  // Every finite half survives float -> half -> float exactly.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if (((h >> 10) & 0x1f) == 0x1f) continue;
    const float f = numeric::f16_to_f32(static_cast<uint16_t>(h));
    const uint16_t back = numeric::f32_to_f16(f);
    CHECK(back == h || (f == 0.0f && (back & 0x7fff) == 0), "half 0x%04x -> %g -> 0x%04x", h, f, back);
  }
  CHECK(numeric::f32_to_f16(65520.0f) == 0x7c00, "65520 rounds to infinity");
  CHECK(numeric::f32_to_bf16(1.00390625f) == 0x3f80, "bf16 ties to even");
}

void test_pack_round_trip() {
  std::mt19937 rng(1);
  for (int bits = kMinBits; bits <= kMaxBits; ++bits) {
    for (int64_t k : {1, 64, 172, 1000}) {
      const int64_t n = 3, g = 64;
      std::vector<uint8_t> codes(n * k), back(n * k);
      for (auto& c : codes) c = static_cast<uint8_t>(rng() & max_code(bits));
      std::vector<uint8_t> packed(n * packed_row_bytes(k, g, bits));
      CHECK(pack(codes.data(), n, k, bits, g, packed.data(), 1) == 0, "pack bits=%d", bits);
      unpack(packed.data(), n, k, bits, g, back.data(), 1);
      CHECK(codes == back, "round trip bits=%d k=%lld", bits, static_cast<long long>(k));
    }
  }
  std::vector<uint8_t> bad = {16, 0, 0, 0, 0, 0, 0, 0}, out(4);
  CHECK(pack(bad.data(), 1, 8, 4, 8, out.data(), 1) == 1, "pack reports out-of-range codes");
}

void test_gemv(Isa isa) {
  set_isa(isa);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int bits : {3, 4, 6}) {
    for (int64_t g : {32, 64}) {
      for (int64_t m : {1, 3, 5}) {
        const int64_t n = 13, k = 200;
        std::vector<float> w(n * k), x(m * k), y(m * n), bias(n);
        for (auto& v : w) v = normal(rng);
        for (auto& v : x) v = normal(rng);
        for (auto& v : bias) v = normal(rng);
        const int64_t groups = num_groups(k, g);
        std::vector<uint16_t> scale(n * groups);
        std::vector<uint8_t> zero(n * groups), codes(n * k);
        std::vector<uint8_t> packed(n * packed_row_bytes(k, g, bits));
        quant_params(w.data(), n, k, bits, g, 0, scale.data(), zero.data(), 1);
        quantize(w.data(), scale.data(), zero.data(), n, k, bits, g, codes.data(), 1);
        pack(codes.data(), n, k, bits, g, packed.data(), 1);
        std::vector<float> deq(n * k);
        dequantize(codes.data(), scale.data(), zero.data(), n, k, g, deq.data(), 1);
        packed_gemv(x.data(), false, m, k, packed.data(), scale.data(), zero.data(), bias.data(), n, k,
                    bits, g, y.data(), false, 2);
        for (int64_t r = 0; r < m; ++r)
          for (int64_t o = 0; o < n; ++o) {
            double exact = bias[o], magnitude = std::fabs(bias[o]);
            for (int64_t i = 0; i < k; ++i) {
              exact += static_cast<double>(x[r * k + i]) * deq[o * k + i];
              magnitude += std::fabs(static_cast<double>(x[r * k + i]) * deq[o * k + i]);
            }
            CHECK(std::fabs(y[r * n + o] - exact) <= 2e-6 * magnitude,
                  "gemv %s bits=%d g=%lld m=%lld: %g vs %g", isa_name(isa), bits,
                  static_cast<long long>(g), static_cast<long long>(m), y[r * n + o], exact);
          }
      }
    }
  }
}

}  // namespace

int main() {
  test_half_conversions();
  test_pack_round_trip();
  const Isa best = detect_isa();
  for (int isa = static_cast<int>(best); isa >= 0; --isa) test_gemv(static_cast<Isa>(isa));
  set_isa(best);
  std::printf("%s: %d failed checks (ISA %s)\n", failures ? "FAILED" : "OK", failures, isa_name(best));
  return failures;
}
