// The driver both ISAs' TILE16 GEMVs share (tiled_avx512.cpp, tiled_avx2.cpp): a problem is planned
// once (its activations prepared, its kernel picked), then its tiles are shared out among the
// threads; several problems of one input run as one loop over all their tiles.
#pragma once
#include <cstdint>

#include "brecq/format.h"
#include "gemv.h"

namespace brecq {
namespace detail {

// The next tile's scales and zeros (a stream of their own, small enough to fetch whole).
BRECQ_ALWAYS_INLINE void prefetch_tile_params(const GemvProblem& p, int64_t tile) {
  if (tile >= tile_count(p.n)) return;
  prefetch_range(p.scale + tile * p.groups * kTileRows, 2 * p.groups * kTileRows);
  prefetch_range(p.zero + tile * p.groups * kTileRows, p.groups * kTileRows);
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

// false, writing nothing, when one of the problems is not held.
template <PlanFn Plan>
bool run_tile_plans(const GemvProblem* problems, int count) {
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
  for_each_index(first_tile[count], problems[0].threads, [&](int64_t tile) {
    int i = 0;
    while (tile >= first_tile[i + 1]) ++i;
    plans[i].run(problems[i], plans[i].activations, tile - first_tile[i]);
  });
  return true;
}

}  // namespace detail
}  // namespace brecq
