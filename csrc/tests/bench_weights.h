// Shared by the standalone GEMV benchmarks (brecq_gemv_bench, bench/ab_gemv): distinct copies of
// one layer's packed weights, the plain read they are compared with, and a median.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <random>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "brecq/format.h"

namespace brecq_bench {

// Copies back to back in one region starting on a 2 MiB boundary, each copy float16 scales, then
// codes, then zeros, so that a plain read folds a copy's bytes in one parallel loop, as the GEMV
// streams them in one call. huge_pages asks Linux for 2 MiB pages (madvise before the first write,
// as brecq_ext.arena does): on the development VM a 2-thread read of 4 KiB pages ran at 30-50
// GB/s, and of huge pages at 63. Codes are random; scales are 2^-7 and zeros mid-range (speed does
// not depend on them).
class WeightPool {
 public:
  WeightPool(int64_t n, int64_t k, int bits, int64_t group_size, int64_t footprint_bytes, int min_copies,
             bool huge_pages = false)
      : scale_bytes_(n * brecq::num_groups(k, group_size) * 2),
        packed_bytes_(n * brecq::packed_row_bytes(k, group_size, bits)),
        layer_bytes_(scale_bytes_ + packed_bytes_ + scale_bytes_ / 2),
        stride_((layer_bytes_ + 63) / 64 * 64),
        copies_(static_cast<int>(std::max<int64_t>(min_copies, footprint_bytes / layer_bytes_))) {
    const size_t huge = size_t{2} << 20;
    region_bytes_ = (static_cast<size_t>(stride_) * copies_ + huge - 1) / huge * huge;
    region_ = static_cast<uint8_t*>(std::aligned_alloc(huge, region_bytes_));
    if (region_ == nullptr) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    if (huge_pages) huge_pages_ = madvise(region_, region_bytes_, MADV_HUGEPAGE) == 0;
#endif
    std::mt19937 rng(0);
    const uint16_t half_2_pow_minus_7 = 0x2000;
    for (int c = 0; c < copies_; ++c) {
      uint8_t* bytes = region_ + static_cast<int64_t>(c) * stride_;
      for (int64_t i = 0; i < scale_bytes_ / 2; ++i) std::memcpy(bytes + 2 * i, &half_2_pow_minus_7, 2);
      for (int64_t i = 0; i < packed_bytes_; ++i) bytes[scale_bytes_ + i] = static_cast<uint8_t>(rng());
      std::fill(bytes + scale_bytes_ + packed_bytes_, bytes + layer_bytes_, static_cast<uint8_t>(1 << (bits - 1)));
    }
  }
  ~WeightPool() { std::free(region_); }
  WeightPool(const WeightPool&) = delete;
  WeightPool& operator=(const WeightPool&) = delete;

  int copies() const { return copies_; }
  int64_t layer_bytes() const { return layer_bytes_; }
  bool huge_pages() const { return huge_pages_; }  // the advice was taken (not that every page is huge)
  // Bytes of the region the kernel backs with huge pages (AnonHugePages of its mappings in
  // /proc/self/smaps; -1 where that cannot be read): the advice can be taken and still leave pages
  // of 4 KiB where the kernel found no free 2 MiB ones, and those read slower.
  int64_t huge_page_bytes() const {
#if defined(__linux__)
    std::FILE* smaps = std::fopen("/proc/self/smaps", "r");
    if (smaps == nullptr) return -1;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(region_), end = begin + region_bytes_;
    char line[512];
    bool inside = false;
    int64_t total = 0;
    while (std::fgets(line, sizeof line, smaps)) {
      unsigned long from = 0, to = 0;
      long long kib = 0;
      if (std::sscanf(line, "%lx-%lx ", &from, &to) == 2 && std::strchr(line, ':') != nullptr &&
          std::strchr(line, '-') < std::strchr(line, ' ')) {
        inside = from < end && to > begin;
      } else if (inside && std::sscanf(line, "AnonHugePages: %lld kB", &kib) == 1) {
        total += kib * 1024;
      }
    }
    std::fclose(smaps);
    return total;
#else
    return -1;
#endif
  }
  int64_t region_bytes() const { return static_cast<int64_t>(region_bytes_); }
  const uint8_t* bytes(int copy) const { return region_ + static_cast<int64_t>(copy % copies_) * stride_; }
  const uint16_t* scale(int copy) const { return reinterpret_cast<const uint16_t*>(bytes(copy)); }
  const uint8_t* packed(int copy) const { return bytes(copy) + scale_bytes_; }
  const uint8_t* zero(int copy) const { return bytes(copy) + scale_bytes_ + packed_bytes_; }

 private:
  int64_t scale_bytes_, packed_bytes_, layer_bytes_, stride_;
  int copies_;
  uint8_t* region_ = nullptr;
  size_t region_bytes_ = 0;
  bool huge_pages_ = false;
};

// A plain read of count bytes on threads threads (XOR-folded in four independent 16-byte lanes,
// which any x86-64 compiler turns into SSE2 loads): the rate a buffer of this size can be read at,
// the GEMV's ceiling at its size. One 64-bit lane reads about 8 bytes a cycle, which from L3 on the
// development VM was 54 GB/s on two threads against 78 for wide loads: too slow to be a ceiling.
inline uint64_t fold_bytes(const uint8_t* bytes, int64_t count, int threads) {
  typedef uint64_t Lane __attribute__((vector_size(16)));
  typedef Lane UnalignedLane __attribute__((aligned(1), may_alias));
  const int64_t blocks = count / 64;
  uint64_t acc = 0;
#pragma omp parallel num_threads(threads) reduction(^ : acc)
  {
    Lane a = {0, 0}, b = a, c = a, d = a;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < blocks; ++i) {
      const UnalignedLane* w = reinterpret_cast<const UnalignedLane*>(bytes + 64 * i);
      a ^= w[0];
      b ^= w[1];
      c ^= w[2];
      d ^= w[3];
    }
    const Lane folded = (a ^ b) ^ (c ^ d);
    acc ^= folded[0] ^ folded[1];
  }
  for (int64_t i = 64 * blocks; i < count; ++i) acc ^= bytes[i];
  return acc;
}

inline double median_of(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

}  // namespace brecq_bench
