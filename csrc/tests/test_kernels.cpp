// Standalone checks of the CPU kernels against straightforward scalar formulas (no torch).
// Exit status is the number of failed checks.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include <omp.h>

#include "brecq/format.h"
#include "brecq/kernels.h"
#include "numeric.h"
#include "team_shares.h"

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

// exp_branchless against double-precision exp on every 61st float32 of its range (about 24 million),
// and its ends: +inf past overflow, 0 below -86, NaN through.
void test_exp_branchless() {
  double worst = 0.0;
  float worst_at = 0.0f;
  for (uint32_t sign = 0; sign < 2; ++sign) {
    for (uint32_t bits = 0; bits < 0x42b17218u; bits += 61) {  // up to 88.72283935546875
      const float x = numeric::bits_to_f32(bits | (sign << 31));
      if (x < -86.0f) break;
      const double exact = std::exp(static_cast<double>(x));
      const float rounded = static_cast<float>(exact);
      const double ulp = static_cast<double>(std::nextafter(rounded, INFINITY)) - rounded;
      const double error = std::fabs(numeric::exp_branchless(x) - exact) / ulp;
      if (error > worst) worst = error, worst_at = x;
    }
  }
  CHECK(worst <= 1.0, "exp_branchless is %.2f ulp off at %.9g", worst, worst_at);
  CHECK(std::isinf(numeric::exp_branchless(88.7229f)) && std::isinf(numeric::exp_branchless(1e30f)) &&
            std::isinf(numeric::exp_branchless(INFINITY)),
        "exp_branchless overflows to +inf");
  CHECK(numeric::exp_branchless(-86.5f) == 0.0f && numeric::exp_branchless(-INFINITY) == 0.0f, "exp_branchless below -86");
  CHECK(std::isnan(numeric::exp_branchless(NAN)), "exp_branchless(NaN)");
  CHECK(numeric::exp_branchless(0.0f) == 1.0f, "exp_branchless(0) = %g", numeric::exp_branchless(0.0f));
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
  // Every width (2, 3, 5 and 7 bits share one decoder per ISA, 4, 6 and 8 have their own), group
  // sizes below, at and above one decode chunk (16 and 48: AVX2's kernels, the portable one on
  // AVX-512), float32 and bfloat16 activations.
  for (int bits = kMinBits; bits <= kMaxBits; ++bits) {
    for (int64_t g : {16, 32, 48, 64, 128}) {
      for (int64_t m : {1, 3, 5}) {
        for (bool bf16 : {false, true}) {
          const int64_t n = 13, k = 200;
          std::vector<float> w(n * k), x(m * k), y(m * n), bias(n);
          std::vector<uint16_t> x_bf16(m * k);
          for (auto& v : w) v = normal(rng);
          for (int64_t i = 0; i < m * k; ++i) {
            x_bf16[i] = numeric::f32_to_bf16(normal(rng));
            x[i] = numeric::bf16_to_f32(x_bf16[i]);  // the exact inputs of both paths
          }
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
          const void* xp = bf16 ? static_cast<const void*>(x_bf16.data()) : x.data();
          packed_gemv(xp, bf16, m, k, packed.data(), scale.data(), zero.data(), bias.data(), n, k, bits, g, y.data(),
                      false, 2);
          for (int64_t r = 0; r < m; ++r)
            for (int64_t o = 0; o < n; ++o) {
              double exact = bias[o], magnitude = std::fabs(bias[o]);
              for (int64_t i = 0; i < k; ++i) {
                exact += static_cast<double>(x[r * k + i]) * deq[o * k + i];
                magnitude += std::fabs(static_cast<double>(x[r * k + i]) * deq[o * k + i]);
              }
              CHECK(std::fabs(y[r * n + o] - exact) <= 2e-6 * magnitude,
                    "gemv %s bits=%d g=%lld m=%lld bf16=%d: %g vs %g", isa_name(isa), bits, static_cast<long long>(g),
                    static_cast<long long>(m), bf16, y[r * n + o], exact);
            }
        }
      }
    }
  }
}

// TILE16 arrangement of integer codes [n, k] and their scales and zeros (format.h), written out
// from the layout's definition.
void tile_up(const std::vector<uint8_t>& codes, const std::vector<uint16_t>& scale, const std::vector<uint8_t>& zero,
             int64_t n, int64_t k, int bits, int64_t g, std::vector<uint8_t>& tiled, std::vector<uint16_t>& tiled_scale,
             std::vector<uint8_t>& tiled_zero) {
  const int64_t tiles = tile_count(n), groups = num_groups(k, g);
  const int64_t tile_bytes = tile_code_bytes(k, g, bits);
  tiled.assign(tiles * tile_bytes, 0);
  tiled_scale.assign(tiles * groups * kTileRows, 0);
  tiled_zero.assign(tiles * groups * kTileRows, 0);
  for (int64_t row = 0; row < n; ++row) {
    const int64_t tile = row / kTileRows, lane = row % kTileRows;
    uint8_t* base = tiled.data() + tile * tile_bytes;
    for (int64_t i = 0; i < k; ++i) {
      const int code = codes[row * k + i], step = static_cast<int>(i / 8), c = static_cast<int>(i % 8);
      if (bits == 4) {
        base[step * 64 + 4 * lane + c / 2] |= static_cast<uint8_t>(code << (4 * (c % 2)));
      } else if (bits == 8) {
        base[(i / 4) * 64 + 4 * lane + i % 4] = static_cast<uint8_t>(code);
      } else {
        uint8_t* pair = base + (step / 2) * 192;
        pair[(step % 2) * 64 + 4 * lane + c / 2] |= static_cast<uint8_t>((code & 15) << (4 * (c % 2)));
        const int bit = 2 * (4 * (step % 2) + c % 4) + 16 * (c / 4);
        pair[128 + 4 * lane + bit / 8] |= static_cast<uint8_t>((code >> 4) << (bit % 8));
      }
    }
    for (int64_t grp = 0; grp < groups; ++grp) {
      tiled_scale[(tile * groups + grp) * kTileRows + lane] = scale[row * groups + grp];
      tiled_zero[(tile * groups + grp) * kTileRows + lane] = zero[row * groups + grp];
    }
  }
}

// The TILE16 GEMV on data whose every product and sum is exact in float32 (activations in -4..4,
// scales 1, 1/2 or 1/4: with the 8-bit kernel's offset of 2176 the partial sums stay below 2^24
// quarters), so that its result must equal the float64 one bit for bit,
// for float32 and bfloat16 activations and outputs, group sizes, row counts across a pass, and
// output counts that leave a tile part empty.
void test_tiled_gemv(Isa isa) {
  set_isa(isa);
  std::mt19937 rng(11);
  for (int bits : {4, 6, 8})
  for (int64_t g : {16, 32, 64, 128}) {
    for (int64_t n : {13, 33}) {
      for (int64_t m : {1, 4, 5}) {
        for (bool bf16 : {false, true}) {
          const int64_t k = 200, groups = num_groups(k, g);
          std::vector<uint8_t> codes(n * k), zero(n * groups), tiled, tiled_zero;
          std::vector<uint16_t> scale(n * groups), tiled_scale, x_bf16(m * k);
          std::vector<float> x(m * k), bias(n), y(m * n);
          for (auto& c : codes) c = static_cast<uint8_t>(rng() & max_code(bits));
          for (auto& z : zero) z = static_cast<uint8_t>(rng() & max_code(bits));
          for (auto& sc : scale) sc = numeric::f32_to_f16(std::ldexp(1.0f, -static_cast<int>(rng() % 3)));
          for (auto& b : bias) b = static_cast<float>(static_cast<int>(rng() % 64) - 32) / 4.0f;
          for (int64_t i = 0; i < m * k; ++i) {
            x[i] = static_cast<float>(static_cast<int>(rng() % 9) - 4);
            x_bf16[i] = numeric::f32_to_bf16(x[i]);
          }
          tile_up(codes, scale, zero, n, k, bits, g, tiled, tiled_scale, tiled_zero);
          const void* xp = bf16 ? static_cast<const void*>(x_bf16.data()) : x.data();
          tiled_gemv(xp, bf16, m, k, tiled.data(), tiled_scale.data(), tiled_zero.data(), bias.data(), n, k, bits, g,
                     y.data(), false, 2);
          std::vector<uint16_t> y_bf16(m * n);
          tiled_gemv(xp, bf16, m, k, tiled.data(), tiled_scale.data(), tiled_zero.data(), bias.data(), n, k, bits, g,
                     y_bf16.data(), true, 2);
          for (int64_t r = 0; r < m; ++r)
            for (int64_t o = 0; o < n; ++o) {
              double exact = bias[o];
              for (int64_t i = 0; i < k; ++i)
                exact += static_cast<double>(x[r * k + i]) * numeric::f16_to_f32(scale[o * groups + i / g]) *
                         (static_cast<int>(codes[o * k + i]) - static_cast<int>(zero[o * groups + i / g]));
              const float got = y[r * n + o];
              CHECK(got == exact, "tiled W%d %s g=%lld n=%lld m=%lld bf16=%d out %lld,%lld: %g vs %g", bits,
                    isa_name(isa), static_cast<long long>(g), static_cast<long long>(n), static_cast<long long>(m), bf16,
                    static_cast<long long>(r), static_cast<long long>(o), got, exact);
              CHECK(y_bf16[r * n + o] == numeric::f32_to_bf16(got), "tiled %s bfloat16 output: 0x%04x vs %g",
                    isa_name(isa), y_bf16[r * n + o], got);
            }
        }
      }
    }
  }
}

// TILE16 dequantization equals the row-major one bit for bit, whole or from a later tile on, for
// group sizes the AVX-512 kernel takes (multiples of 32) and ones only the portable loop takes.
void test_dequantize_tiled(Isa isa) {
  set_isa(isa);
  std::mt19937 rng(5);
  for (int bits : {4, 6, 8})
  for (int64_t g : {16, 32, 64, 128}) {
    if (!tile16_supports(bits, g)) continue;
    for (int64_t n : {13, 33})
    for (int64_t k : {200, 203}) {  // 203: a last step of 3 codes
      for (bool bf16 : {false, true}) {
        const int64_t groups = num_groups(k, g), width = bf16 ? 2 : 4;
        std::vector<uint8_t> codes(n * k), zero(n * groups), packed(n * packed_row_bytes(k, g, bits)), tiled, tiled_zero;
        std::vector<uint16_t> scale(n * groups), tiled_scale;
        for (auto& c : codes) c = static_cast<uint8_t>(rng() & max_code(bits));
        for (auto& z : zero) z = static_cast<uint8_t>(rng() & max_code(bits));
        for (auto& sc : scale) sc = numeric::f32_to_f16(std::uniform_real_distribution<float>(1e-3f, 1.0f)(rng));
        pack(codes.data(), n, k, bits, g, packed.data(), 1);
        tile_up(codes, scale, zero, n, k, bits, g, tiled, tiled_scale, tiled_zero);
        std::vector<uint8_t> rows(n * k * width), from_tiles(n * k * width, 0xAB);
        dequantize_packed(packed.data(), scale.data(), zero.data(), n, k, bits, g, rows.data(), bf16, 2);
        dequantize_tiled(tiled.data(), tiled_scale.data(), tiled_zero.data(), n, k, bits, g, from_tiles.data(), bf16, 2);
        CHECK(rows == from_tiles, "dequantize_tiled W%d %s g=%lld n=%lld k=%lld bf16=%d", bits, isa_name(isa),
              static_cast<long long>(g), static_cast<long long>(n), static_cast<long long>(k), bf16);
        if (n <= kTileRows) continue;
        // Rows 16.. only, from the second tile on: the GEMM path's ranges.
        std::vector<uint8_t> tail((n - 16) * k * width, 0xAB);
        dequantize_tiled(tiled.data() + tile_code_bytes(k, g, bits), tiled_scale.data() + groups * kTileRows,
                         tiled_zero.data() + groups * kTileRows, n - 16, k, bits, g, tail.data(), bf16, 2);
        CHECK(std::equal(tail.begin(), tail.end(), rows.begin() + 16 * k * width),
              "dequantize_tiled from tile 1 %s g=%lld n=%lld bf16=%d", isa_name(isa), static_cast<long long>(g),
              static_cast<long long>(n), bf16);
      }
    }
  }
}

// The AVX-512 4- and 8-bit TILE16 GEMVs with bfloat16 activations round each group of inputs to a
// multiple of 2^(E - 14), 2^E the smallest power of two above its largest magnitude (docs/CPU.md):
// on groups spanning 2^13 the result must be the float64 product with the inputs so rounded (to
// float32 rounding), which differs visibly from the exact one; an Inf input gives a NaN row and
// leaves the other rows exact (the float kernels run the call).
void test_tiled_integer_activations(Isa isa) {
  set_isa(isa);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f / 64);
  for (int bits : {4, 8}) {
    const int64_t n = 33, k = 200, g = 64, m = 3, groups = num_groups(k, g);
    std::vector<uint8_t> codes(n * k), zero(n * groups), tiled, tiled_zero;
    std::vector<uint16_t> scale(n * groups), tiled_scale, x_bf16(m * k);
    std::vector<double> x(m * k), rounded(m * k);
    for (auto& c : codes) c = static_cast<uint8_t>(rng() & max_code(bits));
    for (auto& z : zero) z = static_cast<uint8_t>(rng() & max_code(bits));
    for (auto& sc : scale) sc = numeric::f32_to_f16(0.01f + 0.001f * static_cast<float>(rng() % 16));
    for (int64_t i = 0; i < m * k; ++i) {
      x_bf16[i] = numeric::f32_to_bf16((i % k) % g == 0 ? 128.0f : normal(rng));  // each group's largest: 2^7, E = 8
      x[i] = numeric::bf16_to_f32(x_bf16[i]);
      rounded[i] = std::nearbyint(std::ldexp(x[i], 14 - 8)) * std::ldexp(1.0, 8 - 14);
    }
    tile_up(codes, scale, zero, n, k, bits, g, tiled, tiled_scale, tiled_zero);
    std::vector<float> y(m * n);
    tiled_gemv(x_bf16.data(), true, m, k, tiled.data(), tiled_scale.data(), tiled_zero.data(), nullptr, n, k, bits, g,
               y.data(), false, 2);
    double worst = 0.0, rounding = 0.0;
    for (int64_t r = 0; r < m; ++r)
      for (int64_t o = 0; o < n; ++o) {
        double modelled = 0.0, exact = 0.0, magnitude = 0.0;
        for (int64_t i = 0; i < k; ++i) {
          const double s = numeric::f16_to_f32(scale[o * groups + i / g]);
          const int q = codes[o * k + i], z = zero[o * groups + i / g];
          modelled += rounded[r * k + i] * s * (q - z);
          exact += x[r * k + i] * s * (q - z);
          magnitude += std::fabs(x[r * k + i]) * s * (q + z);
        }
        worst = std::max(worst, std::fabs(y[r * n + o] - modelled) / (std::ldexp(4.0, -24) * magnitude));
        rounding = std::max(rounding, std::fabs(modelled - exact) / (std::ldexp(4.0, -24) * magnitude));
      }
    CHECK(worst <= 1.0, "%s integer activations W%d: off the rounded product by %.2f of the float32 bound", isa_name(isa),
          bits, worst);
    CHECK(rounding > 10.0, "integer activations W%d: the case must round visibly (%.2f)", bits, rounding);

    std::vector<float> y_exact(m * n);
    x_bf16[k + 5] = 0x7f80;  // +Inf in row 1
    tiled_gemv(x_bf16.data(), true, m, k, tiled.data(), tiled_scale.data(), tiled_zero.data(), nullptr, n, k, bits, g,
               y_exact.data(), false, 2);
    const int offset = bits == 4 ? 128 : 2176;  // what the float kernels' codes carry (docs/CPU.md)
    for (int64_t o = 0; o < n; ++o) {
      CHECK(std::isnan(y_exact[n + o]), "W%d: an Inf input gives a NaN output, got %g", bits, y_exact[n + o]);
      double exact = 0.0, magnitude = 0.0;
      for (int64_t i = 0; i < k; ++i) {
        const double s = numeric::f16_to_f32(scale[o * groups + i / g]);
        const int q = codes[o * k + i], z = zero[o * groups + i / g];
        exact += x[i] * s * (q - z);
        magnitude += std::fabs(x[i]) * s * (q + z + 2 * offset);
      }
      CHECK(std::fabs(y_exact[o] - exact) <= std::ldexp(16.0, -24) * magnitude,
            "%s W%d: row 0 beside an Inf row runs the float kernel: %g vs %g", isa_name(isa), bits, y_exact[o], exact);
    }
  }
}

void test_decode_attention() {
  // Qwen3-like grouping (8 query heads on 2 kv heads), a masked batch row, head_dim off the vector width.
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t batch = 2, q_heads = 8, kv_heads = 2, kv_len = 37, d = 36, group = q_heads / kv_heads;
  const float scale = 0.2f;
  std::vector<float> q(batch * q_heads * d), k(batch * kv_heads * kv_len * d), v(k.size()), out(q.size());
  for (auto* t : {&q, &k, &v})
    for (auto& x : *t) x = normal(rng);
  std::vector<uint8_t> mask(batch * kv_len, 1);
  for (int64_t l = 0; l < kv_len; l += 3) mask[kv_len + l] = 0;  // row 1 hides every third key
  decode_attention(q.data(), k.data(), v.data(), mask.data(), false, batch, q_heads, kv_heads, kv_len, d,
                   kv_heads * kv_len * d, kv_len * d, d, kv_heads * kv_len * d, kv_len * d, d, kv_len, scale,
                   out.data(), 2);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < q_heads; ++h) {
      const int64_t kvh = h / group;
      std::vector<double> weight(kv_len, 0.0);
      double top = -INFINITY, sum = 0.0;
      for (int64_t l = 0; l < kv_len; ++l) {
        if (!mask[b * kv_len + l]) continue;
        double dot = 0.0;
        for (int64_t i = 0; i < d; ++i)
          dot += double(q[(b * q_heads + h) * d + i]) * k[((b * kv_heads + kvh) * kv_len + l) * d + i];
        weight[l] = dot * scale;
        top = std::max(top, weight[l]);
      }
      for (int64_t l = 0; l < kv_len; ++l) {
        weight[l] = mask[b * kv_len + l] ? std::exp(weight[l] - top) : 0.0;
        sum += weight[l];
      }
      for (int64_t i = 0; i < d; ++i) {
        double exact = 0.0;
        for (int64_t l = 0; l < kv_len; ++l) exact += weight[l] * v[((b * kv_heads + kvh) * kv_len + l) * d + i];
        exact /= sum;
        const float got = out[(b * q_heads + h) * d + i];
        CHECK(std::fabs(got - exact) <= 1e-5 * (1.0 + std::fabs(exact)), "decode_attention b=%lld h=%lld i=%lld: %g vs %g",
              static_cast<long long>(b), static_cast<long long>(h), static_cast<long long>(i), got, exact);
      }
    }
  }
}

void test_rms_norm() {
  std::mt19937 rng(13);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (int64_t n : {7, 128, 1024}) {
    const int64_t rows = 3, stride = n + 5;
    std::vector<float> x(rows * stride), weight(n), out(rows * n);
    for (auto& v : x) v = normal(rng);
    for (auto& v : weight) v = 0.5f + std::fabs(normal(rng));
    rms_norm(x.data(), false, rows, n, stride, weight.data(), 1e-6f, out.data(), 2);
    std::vector<uint16_t> xb(x.size()), wb(n), ob(out.size());
    for (size_t i = 0; i < x.size(); ++i) xb[i] = numeric::f32_to_bf16(x[i]);
    for (int64_t i = 0; i < n; ++i) wb[i] = numeric::f32_to_bf16(weight[i]);
    rms_norm(xb.data(), true, rows, n, stride, wb.data(), 1e-6f, ob.data(), 2);
    for (int64_t r = 0; r < rows; ++r) {
      double squares = 0.0, squares_b = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        squares += double(x[r * stride + i]) * x[r * stride + i];
        const double b = numeric::bf16_to_f32(xb[r * stride + i]);
        squares_b += b * b;
      }
      const double inverse = 1.0 / std::sqrt(squares / n + 1e-6), inverse_b = 1.0 / std::sqrt(squares_b / n + 1e-6);
      for (int64_t i = 0; i < n; ++i) {
        const double exact = weight[i] * x[r * stride + i] * inverse;
        CHECK(std::fabs(out[r * n + i] - exact) <= 1e-5 * (1.0 + std::fabs(exact)), "rms_norm n=%lld: %g vs %g",
              static_cast<long long>(n), out[r * n + i], exact);
        // bfloat16: the normalised value and the product are each rounded: within two bf16 ulps
        const double exact_b = numeric::bf16_to_f32(wb[i]) * numeric::bf16_to_f32(xb[r * stride + i]) * inverse_b;
        const double got_b = numeric::bf16_to_f32(ob[r * n + i]);
        CHECK(std::fabs(got_b - exact_b) <= std::ldexp(std::fabs(exact_b), -7) + 1e-30, "rms_norm bf16 n=%lld: %g vs %g",
              static_cast<long long>(n), got_b, exact_b);
      }
    }
  }
}


// detail::for_each_index_shared (team_shares.h): every index of every call done exactly once, for
// team sizes 1-4 and counts from 0 up, several calls per region and several regions per TeamShares;
// and when one thread arrives late (it sleeps before its first item), others do part of its share,
// which a static split would have left to it.
void test_team_shares() {
  using detail::TeamShares;
  for (int team : {1, 2, 3, 4}) {
    TeamShares shares(team);
    for (int region = 0; region < 2; ++region) {
      const std::vector<int64_t> counts = {0, 1, 2, 3, 5, 64, 1000};
      std::vector<std::unique_ptr<std::atomic<int>[]>> done;
      std::vector<std::unique_ptr<std::atomic<int>[]>> by;  // which thread did each item
      for (int64_t c : counts) {
        done.emplace_back(new std::atomic<int>[c + 1]);
        by.emplace_back(new std::atomic<int>[c + 1]);
        for (int64_t i = 0; i <= c; ++i) done.back()[i] = 0, by.back()[i] = -1;
      }
      int team_seen = 0;
      shares.reset();
#pragma omp parallel num_threads(team)
      {
#pragma omp single
        team_seen = omp_get_num_threads();
        detail::team_member() = {&shares, 0};
        const int me = omp_get_thread_num();
        for (size_t call = 0; call < counts.size(); ++call) {
          const bool late = me == 0 && call + 1 == counts.size();  // thread 0 starts its last call late
          bool slept = false;
          detail::for_each_index_shared(shares, counts[call], [&](int64_t i) {
            if (late && !slept) {
              std::this_thread::sleep_for(std::chrono::milliseconds(20));
              slept = true;
            }
            done[call][i].fetch_add(1);
            by[call][i].store(me);
          });
        }
        detail::team_member() = {};
      }
      if (team_seen != team) continue;  // the runtime gave fewer threads: the split is not what is tested
      for (size_t call = 0; call < counts.size(); ++call) {
        int64_t wrong = 0;
        for (int64_t i = 0; i < counts[call]; ++i) wrong += done[call][i].load() != 1;
        CHECK(wrong == 0, "team %d, %lld items: %lld not done exactly once", team, static_cast<long long>(counts[call]),
              static_cast<long long>(wrong));
      }
      if (team > 1) {
        // Thread 0's static share of the last call is [0, count / team): others took some of it.
        const int64_t c = counts.back();
        int64_t taken = 0;
        for (int64_t i = 0; i < c / team; ++i) taken += by.back()[i].load() != 0;
        CHECK(taken > 0, "team %d: a late thread's share was left to it alone", team);
      }
    }
  }
}

}  // namespace

int main() {
  test_half_conversions();
  test_exp_branchless();
  test_pack_round_trip();
  const Isa best = detect_isa();
  for (int isa = static_cast<int>(best); isa >= 0; --isa) {
    test_gemv(static_cast<Isa>(isa));
    test_tiled_gemv(static_cast<Isa>(isa));
    test_dequantize_tiled(static_cast<Isa>(isa));
  }
  for (Isa tier : {Isa::kAvx512, Isa::kAvx512Vnni})
    if (best >= tier) test_tiled_integer_activations(tier);
  test_decode_attention();
  test_rms_norm();
  test_team_shares();
  set_isa(best);
  std::printf("%s: %d failed checks (ISA %s)\n", failures ? "FAILED" : "OK", failures, isa_name(best));
  return failures;
}
