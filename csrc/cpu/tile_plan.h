// The driver both ISAs' TILE16 GEMVs share (tiled_avx512.cpp, tiled_avx2.cpp): a problem is planned
// once (its activations prepared, its kernel picked), then its tiles are shared out among the
// threads; several problems of one input run as one loop over all their tiles.
#pragma once
#include <cstdint>

#include "brecq/format.h"
#include "gemv.h"

namespace brecq {
namespace detail {

// Scales and zeros: TILE16 keeps them tile by tile, group by group (48 bytes a group), one slow
// sequential stream beside the codes. Each kernel requests them a group at a time,
// kParamsAheadGroups groups before use (into the next tile's first groups near a tile's end), and
// run_tile requests a tile's own first groups, in case the thread has just jumped to it. The burst
// this replaces, the whole next tile's at the start of each tile (24-36 lines at 2048-3072 inputs,
// which then sat in L1 behind a tile's 24 KB of codes), held the wide calls back. One thread from
// memory, `brecq_gemv_bench B N K 1 1 1 200 512 1 1`, 4 alternating processes, medians of the
// plain read beside each: W6 1152x2048 went from 79 % to 93 %, W4 1024x3072 from 77 % to 88 %, W8
// 1024x3072 from 84 % to 88 %; W4 3072x1024 and W6 2304x1024 stayed at 90-96 %. 8 KiB of codes
// ahead instead of 4 groups (8-16 groups) measured worse in the decode step (docs/CPU.md).
constexpr int64_t kParamsAheadGroups = 4;

// `group` counts groups across tiles (tile * groups + group in tile), the params' own order.
BRECQ_ALWAYS_INLINE void prefetch_group_params(const GemvProblem& p, int64_t group) {
  if (group >= tile_count(p.n) * p.groups) return;
  __builtin_prefetch(p.scale + group * kTileRows, 0, 3);
  __builtin_prefetch(p.zero + group * kTileRows, 0, 3);
}

BRECQ_ALWAYS_INLINE void prefetch_first_group_params(const GemvProblem& p, int64_t tile) {
  const int64_t groups = p.groups < kParamsAheadGroups ? p.groups : kParamsAheadGroups;
  prefetch_range(p.scale + tile * p.groups * kTileRows, 2 * groups * kTileRows);
  prefetch_range(p.zero + tile * p.groups * kTileRows, groups * kTileRows);
}

// Runs one tile of a problem: every activation row's outputs of that tile.
using TileRunFn = void (*)(const GemvProblem&, const uint32_t*, int64_t);

// A problem ready to run tile by tile: its kernel, and its activations as that kernel takes them.
struct TilePlan {
  TileRunFn run = nullptr;
  const uint32_t* activations = nullptr;
};

// Prepares a problem's activations (in its scratch) and picks its kernel; false, preparing
// nothing the caller relies on, when the ISA's kernels do not hold the problem.
using PlanFn = bool (*)(const GemvProblem&, TilePlan*);

template <PlanFn Plan>
bool run_tile_plan(const GemvProblem& p) {
  TilePlan plan;
  if (!Plan(p, &plan)) return false;
  for_each_index(tile_count(p.n), p.threads, [&](int64_t tile) { plan.run(p, plan.activations, tile); });
  return true;
}

// false, writing nothing, when one of the problems is not held. With `after_tile` (problems of one
// n), each item is one tile index: that tile of every problem, then the epilogue on its columns.
template <PlanFn Plan>
bool run_tile_plans(const GemvProblem* problems, int count, const TileEpilogue* after_tile) {
  TilePlan plans[kMaxTiledBatch];
  int64_t first_tile[kMaxTiledBatch + 1] = {0};
  for (int i = 0; i < count; ++i) {
    // Problems sharing their prepared input (tiled_gemv_batch gives calls of one width and group
    // size the same one) share its plan: the activations are converted once.
    int same = 0;
    while (same < i && !(problems[same].scratch == problems[i].scratch && problems[same].bits == problems[i].bits &&
                         problems[same].g == problems[i].g))
      ++same;
    if (same < i) plans[i] = plans[same];
    else if (!Plan(problems[i], &plans[i])) return false;
    first_tile[i + 1] = first_tile[i] + tile_count(problems[i].n);
  }
  if (after_tile) {
    const int64_t n = problems[0].n;
    for_each_index(tile_count(n), problems[0].threads, [&](int64_t tile) {
      for (int i = 0; i < count; ++i) plans[i].run(problems[i], plans[i].activations, tile);
      run_tile_epilogue(*after_tile, tile, n);
    });
    return true;
  }
  for_each_index(first_tile[count], problems[0].threads, [&](int64_t tile) {
    int i = 0;
    while (tile >= first_tile[i + 1]) ++i;
    plans[i].run(problems[i], plans[i].activations, tile - first_tile[i]);
  });
  return true;
}

}  // namespace detail
}  // namespace brecq
