// Standalone GEMV timing for profiling the kernel without Python (perf, valgrind):
//   brecq_gemv_bench [bits=4] [n=3072] [k=1024] [rows=1] [bf16=1] [threads=2] [reps=200] [footprint_mib=256]
// Weights (codes, scales and zeros) are cycled through 256 MiB of distinct copies, as in a real
// model; a footprint that fits in cache (e.g. 0) times the kernel's compute alone.
//
// Each GEMV call alternates with a plain read of another copy's bytes on as many threads (the
// same bytes a call streams, XOR-folded 64 bits at a time): the rate a buffer of this size can be
// read at, measured in the same seconds. A call of a few hundred kilobytes never reaches the rate
// of a large streaming read, so this is the GEMV's ceiling at its size.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "brecq/format.h"
#include "brecq/kernels.h"

namespace {

// One allocation per copy: scales (float16), then codes, then zeros, so that the read below
// folds a copy's bytes in one parallel loop, as the GEMV streams them in one call.
struct Copy {
  std::vector<uint8_t> bytes;
  const uint16_t* scale() const { return reinterpret_cast<const uint16_t*>(bytes.data()); }
};

uint64_t fold(const uint8_t* bytes, int64_t count, int threads) {
  const int64_t words = count / 8;
  uint64_t acc = 0;
#pragma omp parallel for reduction(^ : acc) num_threads(threads) schedule(static)
  for (int64_t i = 0; i < words; ++i) {
    uint64_t word;
    std::memcpy(&word, bytes + 8 * i, 8);
    acc ^= word;
  }
  for (int64_t i = 8 * words; i < count; ++i) acc ^= bytes[i];
  return acc;
}

double median_of(std::vector<double>& times) {
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace

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
  // At least two copies, so that the read and the GEMV never share one.
  const int copies = static_cast<int>(std::max<int64_t>(2, footprint / layer_bytes));
  std::mt19937 rng(0);
  std::vector<Copy> pool(copies);
  const int64_t scale_bytes = n * groups * 2, packed_bytes = n * row_bytes;
  for (auto& c : pool) {
    c.bytes.resize(layer_bytes);
    const uint16_t half_2_pow_minus_7 = 0x2000;
    for (int64_t i = 0; i < n * groups; ++i) std::memcpy(c.bytes.data() + 2 * i, &half_2_pow_minus_7, 2);
    for (int64_t i = 0; i < packed_bytes; ++i) c.bytes[scale_bytes + i] = static_cast<uint8_t>(rng());
    std::fill(c.bytes.begin() + scale_bytes + packed_bytes, c.bytes.end(), static_cast<uint8_t>(1 << (bits - 1)));
  }
  std::vector<uint16_t> x(m * k, 0x3f80);  // bfloat16 1.0
  std::vector<float> xf(m * k, 1.0f), y(m * n);
  std::vector<double> gemv_times, read_times;
  uint64_t sink = 0;
  for (int i = 0; i < reps; ++i) {
    const Copy& c = pool[i % copies];
    auto start = std::chrono::steady_clock::now();
    packed_gemv(bf16 ? static_cast<const void*>(x.data()) : xf.data(), bf16, m, k, c.bytes.data() + scale_bytes,
                c.scale(), c.bytes.data() + scale_bytes + packed_bytes, nullptr, n, k, bits, g, y.data(), false,
                threads);
    gemv_times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());

    const Copy& other = pool[(i + copies / 2) % copies];
    start = std::chrono::steady_clock::now();
    sink ^= fold(other.bytes.data(), layer_bytes, threads);
    read_times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  const double gemv = median_of(gemv_times), read = median_of(read_times);
  std::printf("W%d %lldx%lld rows=%lld %s threads=%d isa=%s: median %.1f us, %.1f GB/s of packed weights; "
              "plain read of the same bytes %.1f us, %.1f GB/s (GEMV at %.0f%% of it)%s\n",
              bits, static_cast<long long>(n), static_cast<long long>(k), static_cast<long long>(m),
              bf16 ? "bf16" : "f32", threads, isa_name(active_isa()), gemv * 1e6, layer_bytes / gemv / 1e9, read * 1e6,
              layer_bytes / read / 1e9, 100.0 * read / gemv, sink == 42 ? " " : "");
  return 0;
}
