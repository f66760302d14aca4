// Round-robin A/B timing of the CPU GEMV of two source trees linked into one binary: the working
// tree's kernels (namespace brecq) against another commit's, compiled with -Dbrecq=brecq_base.
// On a shared machine whose memory bandwidth moves from minute to minute, only timings taken in
// the same seconds compare; see bench/ab_gemv.sh, which builds this.
//   ab_gemv n k [rows=1] [threads=2] [footprint_mib=256] [rounds=400] [bits=4] [tiled=0] [huge_pages=0]
// tiled=1 times the TILE16 kernels (tiled_gemv; both trees must have it) on the same bytes read as
// TILE16 (speed does not depend on the values); n must then be a multiple of 16. huge_pages=1 places
// the weight copies on 2 MiB pages, as brecq_ext.arena places a model's.
// Each round times a burst of 8 calls of each variant (order alternating by round) and a plain
// read of the same number of bytes (the rate a buffer of a layer's size can be read at).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "bench_weights.h"
#include "brecq/format.h"
#include "brecq/kernels.h"

namespace brecq_base {
void packed_gemv(const void* x, bool x_is_bf16, int64_t m, int64_t x_stride, const uint8_t* packed,
                 const uint16_t* scale, const uint8_t* zero, const float* bias, int64_t n, int64_t k, int bits,
                 int64_t g, void* y, bool y_is_bf16, int threads);
void tiled_gemv(const void* x, bool x_is_bf16, int64_t m, int64_t x_stride, const uint8_t* codes,
                const uint16_t* scale, const uint8_t* zero, const float* bias, int64_t n, int64_t k, int bits,
                int64_t g, void* y, bool y_is_bf16, int threads);
}

constexpr int kBurst = 8;

int main(int argc, char** argv) {
  auto arg = [&](int i, long fallback) { return argc > i ? std::atol(argv[i]) : fallback; };
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s n k [rows=1] [threads=2] [footprint_mib=256] [rounds=400] [bits=4] [tiled=0] "
                 "[huge_pages=0]\n",
                 argv[0]);
    return 2;
  }
  const int64_t n = arg(1, 0), k = arg(2, 0), m = arg(3, 1), g = 64;
  const int threads = static_cast<int>(arg(4, 2));
  const int64_t footprint = static_cast<int64_t>(arg(5, 256)) << 20;
  const int rounds = static_cast<int>(arg(6, 400));
  const int bits = static_cast<int>(arg(7, 4));
  const bool tiled = arg(8, 0) != 0;
  const bool huge_pages = arg(9, 0) != 0;
  if (tiled && (!brecq::tile16_supports(bits, g) || n % brecq::kTileRows != 0)) {
    std::fprintf(stderr, "tiled=1 needs 4, 6 or 8 bits and n a multiple of %lld\n",
                 static_cast<long long>(brecq::kTileRows));
    return 2;
  }
  // Both trees' kernels behind one call shape: the row-major or the TILE16 GEMV.
  const auto base_gemv = tiled ? brecq_base::tiled_gemv : brecq_base::packed_gemv;
  const auto head_gemv = tiled ? brecq::tiled_gemv : brecq::packed_gemv;
  const brecq_bench::WeightPool pool(n, k, bits, g, footprint, 3 * kBurst, huge_pages);
  const int64_t layer_bytes = pool.layer_bytes();
  std::vector<uint16_t> x(m * k, 0x3f80);  // bfloat16 1.0
  std::vector<float> y_base(m * n), y_head(m * n);
  std::vector<double> times[3];  // base, head, plain read
  uint64_t sink = 0;
  int next = 0;
  for (int round = 0; round < rounds; ++round) {
    for (int slot = 0; slot < 3; ++slot) {
      const int variant = (slot + round) % 3;
      const auto start = std::chrono::steady_clock::now();
      for (int call = 0; call < kBurst; ++call) {
        const int copy = next++;
        if (variant == 0)
          base_gemv(x.data(), true, m, k, pool.packed(copy), pool.scale(copy), pool.zero(copy), nullptr, n, k, bits, g,
                    y_base.data(), false, threads);
        else if (variant == 1)
          head_gemv(x.data(), true, m, k, pool.packed(copy), pool.scale(copy), pool.zero(copy), nullptr, n, k, bits, g,
                    y_head.data(), false, threads);
        else
          sink ^= brecq_bench::fold_bytes(pool.bytes(copy), layer_bytes, threads);
      }
      times[variant].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() /
                               kBurst);
    }
  }
  // Both trees must compute the same product (up to summation order) on one copy.
  base_gemv(x.data(), true, m, k, pool.packed(0), pool.scale(0), pool.zero(0), nullptr, n, k, bits, g, y_base.data(),
            false, threads);
  head_gemv(x.data(), true, m, k, pool.packed(0), pool.scale(0), pool.zero(0), nullptr, n, k, bits, g, y_head.data(),
            false, threads);
  float worst = 0.0f;
  for (int64_t i = 0; i < m * n; ++i) worst = std::max(worst, std::abs(y_base[i] - y_head[i]));
  const double base = brecq_bench::median_of(times[0]), head = brecq_bench::median_of(times[1]),
               read = brecq_bench::median_of(times[2]);
  std::printf("W%d%s %lldx%lld rows=%lld threads=%d: base %.1f us, head %.1f us, head/base speed %.2fx; "
              "plain read %.1f us (%.1f GB/s), head at %.0f%% of it; max |y_base - y_head| %.3g%s%s\n",
              bits, tiled ? " TILE16" : "", static_cast<long long>(n), static_cast<long long>(k), static_cast<long long>(m), threads,
              base * 1e6, head * 1e6, base / head, read * 1e6, layer_bytes / read / 1e9, 100.0 * read / head, worst,
              pool.huge_pages() ? "; huge pages" : "", sink == 42 ? " " : "");
  return 0;
}
