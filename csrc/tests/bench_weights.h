// Shared by the standalone GEMV benchmarks (brecq_gemv_bench, bench/ab_gemv): distinct copies of
// one layer's packed weights, the plain read they are compared with, and a median.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "brecq/format.h"

namespace brecq_bench {

// One allocation per copy: float16 scales, then codes, then zeros, so that a plain read folds a
// copy's bytes in one parallel loop, as the GEMV streams them in one call. Codes are random;
// scales are 2^-7 and zeros mid-range (speed does not depend on them).
class WeightPool {
 public:
  WeightPool(int64_t n, int64_t k, int bits, int64_t group_size, int64_t footprint_bytes, int min_copies)
      : scale_bytes_(n * brecq::num_groups(k, group_size) * 2),
        packed_bytes_(n * brecq::packed_row_bytes(k, group_size, bits)),
        layer_bytes_(scale_bytes_ + packed_bytes_ + scale_bytes_ / 2) {
    const int copies = static_cast<int>(std::max<int64_t>(min_copies, footprint_bytes / layer_bytes_));
    std::mt19937 rng(0);
    copies_.resize(copies);
    const uint16_t half_2_pow_minus_7 = 0x2000;
    for (auto& bytes : copies_) {
      bytes.resize(layer_bytes_);
      for (int64_t i = 0; i < scale_bytes_ / 2; ++i) std::memcpy(bytes.data() + 2 * i, &half_2_pow_minus_7, 2);
      for (int64_t i = 0; i < packed_bytes_; ++i) bytes[scale_bytes_ + i] = static_cast<uint8_t>(rng());
      std::fill(bytes.begin() + scale_bytes_ + packed_bytes_, bytes.end(), static_cast<uint8_t>(1 << (bits - 1)));
    }
  }
  int copies() const { return static_cast<int>(copies_.size()); }
  int64_t layer_bytes() const { return layer_bytes_; }
  const uint8_t* bytes(int copy) const { return copies_[copy % copies()].data(); }
  const uint16_t* scale(int copy) const { return reinterpret_cast<const uint16_t*>(bytes(copy)); }
  const uint8_t* packed(int copy) const { return bytes(copy) + scale_bytes_; }
  const uint8_t* zero(int copy) const { return bytes(copy) + scale_bytes_ + packed_bytes_; }

 private:
  int64_t scale_bytes_, packed_bytes_, layer_bytes_;
  std::vector<std::vector<uint8_t>> copies_;
};

// A plain read of count bytes on threads threads (XOR-folded 64 bits at a time): the rate a buffer
// of this size can be read at, the GEMV's ceiling at its size.
inline uint64_t fold_bytes(const uint8_t* bytes, int64_t count, int threads) {
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

inline double median_of(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

}  // namespace brecq_bench
