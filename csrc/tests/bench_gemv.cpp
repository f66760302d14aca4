// Standalone GEMV timing for profiling the kernel without Python (perf, valgrind):
//   brecq_gemv_bench [bits=4] [n=3072] [k=1024] [rows=1] [bf16=1] [threads=2] [reps=200] [footprint_mib=256]
// Weights are cycled through 256 MiB of distinct packed matrices, as in a real model; a footprint
// that fits in cache (e.g. 1) times the kernel's compute alone.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "brecq/format.h"
#include "brecq/kernels.h"

int main(int argc, char** argv) {
  using namespace brecq;
  auto arg = [&](int i, long fallback) { return argc > i ? std::atol(argv[i]) : fallback; };
  const int bits = static_cast<int>(arg(1, 4));
  const int64_t n = arg(2, 3072), k = arg(3, 1024), m = arg(4, 1), g = 64;
  const bool bf16 = arg(5, 1) != 0;
  const int threads = static_cast<int>(arg(6, 2));
  const int reps = static_cast<int>(arg(7, 200));
  const int64_t row_bytes = packed_row_bytes(k, g, bits), groups = num_groups(k, g);
  const int64_t layer_bytes = n * row_bytes + n * groups * 3;
  const int64_t footprint = static_cast<int64_t>(arg(8, 256)) << 20;
  const int copies = static_cast<int>(std::max<int64_t>(1, footprint / layer_bytes));
  std::mt19937 rng(0);
  std::vector<std::vector<uint8_t>> packed(copies, std::vector<uint8_t>(n * row_bytes));
  for (auto& p : packed) for (auto& b : p) b = static_cast<uint8_t>(rng());
  std::vector<uint16_t> scale(n * groups, 0x2000);
  std::vector<uint8_t> zero(n * groups, 8);
  std::vector<uint16_t> x(m * k, 0x3f80);
  std::vector<float> xf(m * k, 1.0f), y(m * n);
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    const auto& p = packed[i % copies];
    const auto start = std::chrono::steady_clock::now();
    packed_gemv(bf16 ? static_cast<const void*>(x.data()) : xf.data(), bf16, m, k, p.data(), scale.data(),
                zero.data(), nullptr, n, k, bits, g, y.data(), false, threads);
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  const double median = times[times.size() / 2];
  std::printf("W%d %lldx%lld rows=%lld %s threads=%d isa=%s: median %.1f us, %.1f GB/s of packed weights\n",
              bits, static_cast<long long>(n), static_cast<long long>(k), static_cast<long long>(m),
              bf16 ? "bf16" : "f32", threads, isa_name(active_isa()), median * 1e6, layer_bytes / median / 1e9);
  return 0;
}
