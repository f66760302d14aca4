#!/usr/bin/env bash
# One prepared run for a GPU session (device tool): build with the CUDA kernels, run the CUDA tests
# and the CUDA benchmarks, leave logs and JSON in $OUT (or ./gpu-out). Meant to finish in well under
# 10 minutes on an H100/H200:
#   bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
python3 -m venv /tmp/brecq-venv && . /tmp/brecq-venv/bin/activate
pip install -q torch 2>&1 | tail -2          # the device machine's CUDA build of torch
BRECQ_CUDA=1 BRECQ_CUDA_ARCHS="90" pip install -q ".[test]" 2>&1 | tail -5
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
# CUDA cases of the test suite (ids carry "cuda"), then the benchmarks.
timeout 300 pytest -q -k cuda -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
timeout 240 python bench/gpu_bench.py --out "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/bench.log" | tail -30
