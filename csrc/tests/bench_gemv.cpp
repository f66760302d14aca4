// Standalone GEMV timing for profiling the kernel without Python (perf, valgrind):
//   brecq_gemv_bench [bits=4] [n=3072] [k=1024] [rows=1] [bf16=1] [threads=2] [reps=200] [footprint_mib=256]
//                    [tiled=0] [huge_pages=0]
// tiled=1 times the TILE16 kernel (format.h, 4 or 6 bits) instead of the row-major one; n must be a
// multiple of 16 (the same bytes, read as TILE16: speed does not depend on the values).
// Weights (codes, scales and zeros) are cycled through 256 MiB of distinct copies, as in a real
// model; a footprint that fits in cache (e.g. 0) times the kernel's compute alone. huge_pages=1
// places them on 2 MiB pages (Linux transparent huge pages), as brecq_ext.arena places a model's.
//
// Each GEMV call alternates with a plain read of another copy's bytes on as many threads (the
// same bytes a call streams, XOR-folded 64 bits at a time): the rate a buffer of this size can be
// read at, measured in the same seconds. A call of a few hundred kilobytes never reaches the rate
// of a large streaming read, so this is the GEMV's ceiling at its size. The GEMVs take the even
// copies and the reads the odd ones, so both sample the same stretches of the pool: on the
// development VM one half of a pool could read 2x slower than the other (the same bytes, other
// host memory, by the look of it), which made a GEMV look 30 % as fast as a read half a pool away.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "bench_weights.h"
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
  const int64_t footprint = static_cast<int64_t>(arg(8, 256)) << 20;
  const bool tiled = arg(9, 0) != 0;
  const bool huge_pages = arg(10, 0) != 0;
  if (tiled && (!tile16_supports(bits, g) || n % kTileRows != 0 || k % g != 0)) {
    std::fprintf(stderr, "tiled=1 needs bits 4 or 6, and n a multiple of %lld\n", static_cast<long long>(kTileRows));
    return 2;
  }
  // At least two copies, so that the read and the GEMV never share one.
  const brecq_bench::WeightPool pool(n, k, bits, g, footprint, 2, huge_pages);
  const int64_t layer_bytes = pool.layer_bytes();
  std::vector<uint16_t> x(m * k, 0x3f80);  // bfloat16 1.0
  std::vector<float> xf(m * k, 1.0f), y(m * n);
  std::vector<double> gemv_times, read_times;
  uint64_t sink = 0;
  for (int i = 0; i < reps; ++i) {
    auto start = std::chrono::steady_clock::now();
    const void* xp = bf16 ? static_cast<const void*>(x.data()) : xf.data();
    if (tiled)
      tiled_gemv(xp, bf16, m, k, pool.packed(2 * i), pool.scale(2 * i), pool.zero(2 * i), nullptr, n, k, bits, g, y.data(), false,
                 threads);
    else
      packed_gemv(xp, bf16, m, k, pool.packed(2 * i), pool.scale(2 * i), pool.zero(2 * i), nullptr, n, k, bits, g, y.data(), false,
                  threads);
    gemv_times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());

    start = std::chrono::steady_clock::now();
    sink ^= brecq_bench::fold_bytes(pool.bytes(2 * i + 1), layer_bytes, threads);
    read_times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  const double gemv = brecq_bench::median_of(gemv_times), read = brecq_bench::median_of(read_times);
  char pages[96] = "";
  if (pool.huge_pages()) {
    const int64_t huge = pool.huge_page_bytes();
    if (huge < 0) std::snprintf(pages, sizeof pages, "; huge pages advised");
    else std::snprintf(pages, sizeof pages, "; %lld of %lld MiB on huge pages", static_cast<long long>(huge >> 20),
                       static_cast<long long>(pool.region_bytes() >> 20));
  }
  std::printf("W%d%s %lldx%lld rows=%lld %s threads=%d isa=%s: median %.1f us, %.1f GB/s of packed weights; "
              "plain read of the same bytes %.1f us, %.1f GB/s (GEMV at %.0f%% of it)%s%s\n",
              bits, tiled ? " TILE16" : "", static_cast<long long>(n), static_cast<long long>(k), static_cast<long long>(m),
              bf16 ? "bf16" : "f32", threads, isa_name(active_isa()), gemv * 1e6, layer_bytes / gemv / 1e9, read * 1e6,
              layer_bytes / read / 1e9, 100.0 * read / gemv, pages, sink == 42 ? " " : "");
  return 0;
}
