// What state the host is in, for reading other timings: a plain read's rate, an OpenMP barrier's cost
// and the round trip of one cache line between two threads, sampled together.
//   brecq_host_probe [samples=10] [pause_ms=1000] [read_mib=512]
// On the development VM (2 vCPUs, AMD EPYC Zen 4) these move together: in the minutes when 2
// threads read at ~60 GB/s, a line goes back and forth in ~330 ns and a barrier costs ~0.5 us; when
// they read at ~35 GB/s, ~55 ns and ~0.3 us. Our reading: the two vCPUs then sit on cores of two
// core complexes (each with its own L3 and memory link) rather than one. A step of the decoder
// runtime reads twice as fast there, but every handoff between its threads costs six times as much
// (docs/CPU.md, "What bounds a step when memory is fast").
#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include <omp.h>

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// GB/s of two threads XOR-folding their halves of the buffer.
double read_rate(const uint64_t* words, size_t bytes, uint64_t* sink) {
  const auto start = Clock::now();
  uint64_t folded = 0;
#pragma omp parallel num_threads(2) reduction(^ : folded)
  {
    const size_t half = bytes / 8 / 2, first = static_cast<size_t>(omp_get_thread_num()) * half;
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (size_t i = first; i < first + half; i += 4) a ^= words[i], b ^= words[i + 1], c ^= words[i + 2], d ^= words[i + 3];
    folded ^= a ^ b ^ c ^ d;
  }
  *sink ^= folded;
  return bytes / seconds_since(start) / 1e9;
}

// Microseconds per OpenMP barrier of two threads.
double barrier_cost(int count) {
  const auto start = Clock::now();
#pragma omp parallel num_threads(2)
  for (int i = 0; i < count; ++i) {
#pragma omp barrier
  }
  return seconds_since(start) / count * 1e6;
}

// Nanoseconds for one line to go from thread 0 to thread 1 and back.
double round_trip(int count) {
  alignas(64) static std::atomic<int> turn{0};
  turn.store(0);
  const auto start = Clock::now();
#pragma omp parallel num_threads(2)
  {
    const int me = omp_get_thread_num();
    for (int i = 0; i < count; ++i) {
      const int mine = 2 * i + me;
      while (turn.load(std::memory_order_acquire) != mine) {
      }
      turn.store(mine + 1, std::memory_order_release);
    }
  }
  return seconds_since(start) / count * 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  auto arg = [&](int i, long fallback) { return argc > i ? std::atol(argv[i]) : fallback; };
  const long samples = arg(1, 10), pause_ms = arg(2, 1000);
  const size_t bytes = static_cast<size_t>(arg(3, 512)) << 20;
  if (samples < 1 || pause_ms < 0 || bytes < (1u << 20)) {
    std::fprintf(stderr, "usage: brecq_host_probe [samples>=1] [pause_ms>=0] [read_mib>=1]\n");
    return 2;
  }
  void* buffer = std::aligned_alloc(2u << 20, bytes);
  if (!buffer) {
    std::fprintf(stderr, "could not allocate %zu MiB\n", bytes >> 20);
    return 1;
  }
  madvise(buffer, bytes, MADV_HUGEPAGE);  // as the weight arena asks
  std::memset(buffer, 1, bytes);
  uint64_t sink = 0;
  for (long s = 0; s < samples; ++s) {
    const double rate = read_rate(static_cast<const uint64_t*>(buffer), bytes, &sink);
    const double barrier = barrier_cost(100000), trip = round_trip(100000);
    std::printf("read %.1f GB/s  barrier %.2f us  line round trip %.0f ns%s\n", rate, barrier, trip, sink == 42 ? " " : "");
    std::fflush(stdout);
    if (s + 1 < samples) std::this_thread::sleep_for(std::chrono::milliseconds(pause_ms));
  }
  std::free(buffer);
  return 0;
}
