#!/usr/bin/env bash
# A/B the CPU GEMV kernels of the working tree against another commit's, in one process:
#   bash bench/ab_gemv.sh BASE_COMMIT [ab_gemv args...]
#   bash bench/ab_gemv.sh HEAD~1                  # the Qwen3-0.6B shapes, 1 row, 2 threads
#   bash bench/ab_gemv.sh HEAD~1 1024 3072 4 1 0  # one shape: n k rows threads footprint_mib
#   bash bench/ab_gemv.sh HEAD~1 3072 1024 1 2 256 400 4 1   # ... rounds bits tiled: the TILE16 kernels
#   bash bench/ab_gemv.sh HEAD~1 3072 1024 1 2 256 400 4 1 1 # ... huge_pages: weights on 2 MiB pages
# BASE_COMMIT's csrc/ is compiled with -Dbrecq=brecq_base so both copies link into one binary
# (bench/ab_gemv/ab_gemv.cpp); its packed_gemv (and, for tiled=1, tiled_gemv) signature must match
# the working tree's.
set -euo pipefail
base=${1:?usage: bench/ab_gemv.sh BASE_COMMIT [n k rows threads footprint_mib rounds bits tiled huge_pages]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git -C "$root" archive "$base" csrc | tar -x -C "$work"
flags=(-O3 -std=c++17 -fopenmp -ffp-contract=off -DBRECQ_HAVE_X86_DISPATCH -mavx2 -mfma -mf16c)
compile() {  # out_dir src_root [extra flags]
  local out=$1 src=$2; shift 2
  mkdir -p "$out"
  local pids=()
  for f in "$src"/csrc/cpu/*.cpp; do
    g++ "${flags[@]}" "$@" -I"$src/csrc/include" -I"$src/csrc/cpu" -c "$f" -o "$out/$(basename "${f%.cpp}").o" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
}
compile "$work/base" "$work" -Dbrecq=brecq_base
compile "$work/head" "$root"
g++ -O2 -std=c++17 -fopenmp -I"$root/csrc/include" -I"$root/csrc/tests" "$root/bench/ab_gemv/ab_gemv.cpp" "$work"/head/*.o "$work"/base/*.o \
  -o "$work/ab_gemv"
echo "base $(git -C "$root" rev-parse --short "$base") vs head (working tree $(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet -- csrc || echo ' + edits'))"
if [ $# -gt 0 ]; then
  "$work/ab_gemv" "$@"
else
  for shape in "2048 1024" "1024 1024" "1024 2048" "3072 1024" "1024 3072"; do  # q, k/v, o, gate/up, down
    "$work/ab_gemv" $shape 1 2 256
  done
fi
