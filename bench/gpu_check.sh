#!/usr/bin/env bash
# One prepared run for a GPU session (device tool): build with the CUDA kernels, run the CUDA tests,
# the CUDA benchmarks, BRECQ timing on the GPU, a compute-sanitizer pass, Nsight Compute on the
# lm_head GEMV and decode with a torch.compile'd step; logs and JSON land in $OUT (default
# ./gpu-out). The device image has torch, transformers, pybind11, pytest and the rest, and no
# network: install without isolation, dependencies or an index. Each stage has its own time limit
# and a failing stage does not stop the next. On an H100 (2026-11-27): build 40 s, tests 2 min,
# GEMV timings 15 s (the decode sections 40 s more with two models), memcheck 10 s, ncu 10 s,
# compiled decode 2 min (two models; three since the W4 lm_head model was added).
#   bash bench/gpu_check.sh
#   STAGES="build tests bench memcheck" bash bench/gpu_check.sh   # a subset (default: all seven)
#   TEST_FILTER=fusion BENCH_SECTIONS=decode BENCH_MODELS=bf16,w4w6,w4w6_fused bash bench/gpu_check.sh
set -uo pipefail
STAGES=${STAGES:-build tests bench brecq memcheck profile compiled}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYTHONUNBUFFERED=1
REPO=$PWD
stage() {  # stage NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, print the tail and the time
  local name=$1 limit=$2; shift 2
  case " $STAGES " in *" $name "*) ;; *) echo "=== $name: skipped (not in STAGES)"; return 0 ;; esac
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  tail -n 25 "$OUT/$name.log"
}
{ nvidia-smi; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; \
  "$CUDA_HOME/bin/nvcc" --version; nproc; } > "$OUT/env.txt" 2>&1
head -n 20 "$OUT/env.txt"

stage build 150 env BRECQ_CUDA=1 BRECQ_CUDA_ARCHS=90 python3 -m pip install -v --no-build-isolation \
  --no-deps --no-index "$REPO"
# The installed package, not the source tree: run the tests from a scratch copy.
SCRATCH=$(mktemp -d) && cp -r "$REPO/tests" "$SCRATCH/"
cd "$SCRATCH/tests"
stage tests 200 python3 -m pytest -q -p no:cacheprovider -n 8 -k "${TEST_FILTER:-cuda}" .
cd "$REPO"
cd "$SCRATCH"
stage bench 200 python3 "$REPO/bench/gpu_bench.py" --out "$OUT/gpu_bench.json" ${BENCH_SECTIONS:+--sections $BENCH_SECTIONS} \
  ${BENCH_MODELS:+--models $BENCH_MODELS}
python3 "$REPO/bench/gpu_summary.py" "$OUT/gpu_bench.json"
stage brecq 120 python3 "$REPO/bench/brecq_speed_qwen3.py" --blocks 2 --iters 100 --samples 32 --device cuda
stage memcheck 45 compute-sanitizer --tool memcheck --error-exitcode 9 python3 "$REPO/bench/cuda_memcheck.py"
# Nsight Compute's view of the two tensor-core kernels on the W4 lm_head at 1 row (warm-up calls
# skipped): where the 16-feature kernel stalls short of the copy bandwidth.
stage profile 90 ncu --kernel-name regex:gemv_mma --launch-skip 5 --launch-count 5 --section SpeedOfLight \
  --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats \
  python3 "$REPO/bench/ncu_gemv.py" --out 151936 --in 1024 --bits 4 --rows 1
# Last, as it may take minutes of compilation: decode with a torch.compile'd step (8 files in $OUT
# in all, the most the device tool brings back).
stage compiled 300 python3 "$REPO/bench/gpu_bench.py" --out "$OUT/gpu_bench.json" --merge --sections decode_compiled \
  ${BENCH_MODELS:+--models $BENCH_MODELS}
python3 "$REPO/bench/gpu_summary.py" "$OUT/gpu_bench.json" | tail -n 4
