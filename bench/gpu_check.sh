#!/usr/bin/env bash
# One prepared run for a GPU session (device tool): build with the CUDA kernels, run the CUDA tests
# and the CUDA benchmarks, leave logs and JSON in $OUT (or ./gpu-out). The device image has torch,
# transformers, pybind11, pytest and the rest, and no network: install without isolation or deps.
# Meant to finish well inside 10 minutes on an H100/H200:
#   bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
BRECQ_CUDA=1 BRECQ_CUDA_ARCHS="90" BRECQ_BUILD_JOBS=16 python3 -m pip install -q --no-build-isolation \
  --no-deps --no-index . 2>&1 | tail -5 | tee "$OUT/build.log"
# The installed package, not the source tree: run from a scratch directory.
cp -r tests "$OUT/../gpu-tests" 2>/dev/null || true
(cd "$OUT/../gpu-tests" 2>/dev/null && timeout 300 python3 -m pytest -q -k cuda -p no:cacheprovider \
   --rootdir . . 2>&1 | tee "$OLDPWD/$OUT/tests.log" | tail -15)
timeout 240 python3 bench/gpu_bench.py --out "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/bench.log" | tail -30
