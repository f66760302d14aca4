// Internal interface between the GEMV dispatcher (gemv.cpp) and its per-ISA kernels.
#pragma once
#include <cstdint>

#include "brecq/format.h"
#include "brecq/kernels.h"
#include "team_shares.h"

namespace brecq {
namespace detail {

// Whether the active level has the AVX512_BF16 instructions (VDPBF16PS, VCVTNEPS2BF16): Isa::kAvx512,
// not Isa::kAvx512Vnni. The AVX-512 kernels that use them take another form of the same arithmetic
// where this is false.
inline bool bf16_instructions() { return active_isa() == Isa::kAvx512; }

// The epilogue of tiled_gemv_batch on tile `tile` of calls n outputs wide.
inline void run_tile_epilogue(const TileEpilogue& after_tile, int64_t tile, int64_t n) {
  const int64_t begin = tile * kTileRows;
  after_tile.run(after_tile.context, begin, begin + kTileRows < n ? begin + kTileRows : n);
}

struct GemvProblem {
  const float* x;          // [m, k_padded] float32, natural order, zero beyond k
  const uint16_t* x_bf16;  // [m, k_padded] bfloat16 bits, natural order, or null if x was float32
  const float* xsum;       // [m, groups] sum of x over each group
  float* scratch;          // >= m * k_padded floats: the kernel's own arrangement of x
  int64_t m, n, k, k_padded, groups, g, row_bytes;
  int bits;
  const uint8_t* packed;   // [n, row_bytes], or TILE16 codes, tile_code_bytes(k, g, bits) per tile
  const uint16_t* scale;   // [n, groups] float16 bits, or TILE16 [tile_count(n), groups, 16]
  const uint8_t* zero;     // [n, groups], or TILE16 [tile_count(n), groups, 16]
  const float* bias;       // [n] or null
  float* y;                // [m, n] float32 output, or null when y_bf16 is set
  uint16_t* y_bf16;        // [m, n] bfloat16 output (bits), or null
  int threads;

  void store(int64_t index, float value) const {
    if (y_bf16) {
      // Round to nearest even (NaN is not produced by finite inputs).
      uint32_t bits;
      __builtin_memcpy(&bits, &value, 4);
      y_bf16[index] = static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
    } else {
      y[index] = value;
    }
  }
};

// The prefetch helpers are always inlined: GCC 12's mod-ref analysis finds that a function made
// only of __builtin_prefetch has no effect, and deletes calls to it that it did not inline.
#define BRECQ_ALWAYS_INLINE inline __attribute__((always_inline))

// Requests the cache lines of [start, start + bytes) ahead of use.
BRECQ_ALWAYS_INLINE void prefetch_range(const void* start, int64_t bytes) {
  const char* base = static_cast<const char*>(start);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(base + offset, 0, 3);
  __builtin_prefetch(base + bytes - 1, 0, 3);  // the last line, when start is not line-aligned
}

// A weight row's codes, scales and zeros, requested ahead of use. The scales and zeros are
// streams of their own that the hardware prefetcher did not keep ahead of: without them a
// 3072-input row stalled on its later groups' scales (bench/ab_gemv.sh: down_proj 1.2-1.5x
// faster with them).
BRECQ_ALWAYS_INLINE void prefetch_weight_row(const GemvProblem& p, int64_t row) {
  prefetch_range(p.packed + row * p.row_bytes, p.row_bytes);
  prefetch_range(p.scale + row * p.groups, 2 * p.groups);
  prefetch_range(p.zero + row * p.groups, p.groups);
}

// The k codes of one packed row (format.h), on the calling thread: the portable kernels' decoder.
// (brecq::unpack opens an OpenMP region per call, which inside a GEMV's row loop cost more than the
// row: a 3-bit decode step of a 0.8 M-parameter model took 2.4 ms instead of well under 0.1.)
void unpack_row(const uint8_t* packed, int64_t k, int bits, uint8_t* codes);

// Each returns false (doing nothing) when it has no kernel for this bit width / group size.
bool gemv_avx512(const GemvProblem& p);
bool gemv_avx2(const GemvProblem& p);
void gemv_scalar(const GemvProblem& p);

// Dense [n, k] weights (float32, or bfloat16 bits when out_bf16) from packed ones, for the GEMM
// path; false when there is no kernel for this bit width / group size (the caller's portable loop
// runs then). Results equal the portable loop's bit for bit.
bool dequantize_packed_avx512(const uint8_t* packed, const uint16_t* scale, const uint8_t* zero, int64_t n,
                              int64_t k, int bits, int64_t g, void* out, bool out_bf16, int threads);

// The same product on TILE16 weights (4, 6 or 8 bits, format.h). The AVX-512 kernel declines
// (false) only for a width or group size TILE16 does not hold, or without an AVX-512 build; the
// portable one handles everything.
bool tiled_gemv_avx512(const GemvProblem& p);
// The same on AVX2 (tiled_avx2.cpp); false only for a width or group size TILE16 does not hold.
bool tiled_gemv_avx2(const GemvProblem& p);
void tiled_gemv_scalar(const GemvProblem& p);
// count problems (each prepared into its own buffers) as one loop over all their tiles; false,
// writing nothing, when the AVX-512 kernels do not hold one of them.
bool tiled_gemv_avx512_batch(const GemvProblem* problems, int count, const TileEpilogue* after_tile);
bool tiled_gemv_avx2_batch(const GemvProblem* problems, int count, const TileEpilogue* after_tile);
bool dequantize_tiled_avx2(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, int64_t n, int64_t k,
                           int bits, int64_t g, void* out, bool out_bf16, int threads);
bool dequantize_tiled_avx512(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, int64_t n,
                             int64_t k, int bits, int64_t g, void* out, bool out_bf16, int threads);

// Code i of lane (row) `lane` of a TILE16 tile whose codes start at tile_codes (format.h), read
// from the layout's definition: the portable kernels' decoder.
inline int tile16_code(const uint8_t* tile_codes, int bits, int64_t lane, int64_t i) {
  const int64_t step = i / kTileStepCodes, c = i % kTileStepCodes;
  if (bits == 4) {
    const uint8_t byte = tile_codes[step * kTileStepBytes + 4 * lane + c / 2];
    return (byte >> (4 * (c % 2))) & 0xf;
  }
  if (bits == 8) return tile_codes[(i / 4) * kTileStepBytes + 4 * lane + i % 4];
  const uint8_t* pair = tile_codes + (step / 2) * kTile6PairBytes;
  const uint8_t low = (pair[(step % 2) * kTileStepBytes + 4 * lane + c / 2] >> (4 * (c % 2))) & 0xf;
  const uint8_t* high_lane = pair + 2 * kTileStepBytes + 4 * lane;
  const uint32_t high_bits = static_cast<uint32_t>(high_lane[0]) | static_cast<uint32_t>(high_lane[1]) << 8 |
                             static_cast<uint32_t>(high_lane[2]) << 16 | static_cast<uint32_t>(high_lane[3]) << 24;
  const int64_t field = 4 * (step % 2) + c % 4, bit = 2 * field + 16 * (c / 4);
  return low | static_cast<int>((high_bits >> bit) & 3u) << 4;
}

// Rows of x processed together per pass over a weight row (the weight row stays in L1).
constexpr int kRowsPerPass = 4;

// Whether the calling thread belongs to a team that splits each kernel's work among its threads:
// the C++ decoder (decoder.cpp) runs a whole step in one OpenMP region and sets this on each of its
// threads, so that a kernel called by all of them shares out its rows instead of forking a region
// of its own (a fork and join cost 2-3 us, a decode-sized call 20-60 us). Kernels called from
// anywhere else see false.
bool& in_split_team();

// For its scope, kernels called by this thread run on it alone (threads = 1: no region of their
// own) although it belongs to a split team: for work the caller has already divided among the team.
class AloneInTeam {
 public:
  AloneInTeam() : saved_(in_split_team()) { in_split_team() = false; }
  ~AloneInTeam() { in_split_team() = saved_; }
  AloneInTeam(const AloneInTeam&) = delete;
  AloneInTeam& operator=(const AloneInTeam&) = delete;

 private:
  bool saved_;
};

// Runs body(i) for every i in [0, count), split across threads: among the calling team when
// in_split_team() (every thread of the team must make the call; it ends with the team's barrier;
// shares stolen as team_shares.h describes when the team set up its TeamShares),
// else in a parallel region of its own with `threads` threads.
template <class Body>
inline void for_each_index(int64_t count, int threads, const Body& body) {
  if (in_split_team()) {
    TeamShares* shares = team_member().shares;
    if (shares && count < kMaxSharedItems) {
      for_each_index_shared(*shares, count, body);
      return;
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < count; ++i) body(i);
  } else {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < count; ++i) body(i);
  }
}

}  // namespace detail
}  // namespace brecq
