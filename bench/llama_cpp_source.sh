#!/usr/bin/env bash
# llama.cpp's source tree for the peer benches, from PyPI only (no git host needed): the tree that
# llama-cpp-python vendors in its sdist, at the version installed here (or VERSION).
#
#   bash bench/llama_cpp_source.sh DIR [--llama-bench | --llama-bench-amx | --llama-bench-avx2]
#
# Unpacks DIR/llama_cpp_python-VERSION/vendor/llama.cpp and prints the line to export:
#   BRECQ_LLAMA_CPP_SOURCE  for bench/kquants.py (AutoRound's GGUF export needs its gguf-py and conversion/)
# With --llama-bench it also builds llama.cpp's llama-bench and llama-quantize there (the latter makes
# bench/cpu_runtime.py's GGUF files where llama-cpp-python is not installed; Release, -march=native, AMX off:
# llama-cpp-python's AMX build crashed on this machine's CPU, bench/README.md) for bench/cpu_runtime.py
# --llama-bench; about 15 minutes on 2 cores. --llama-bench-amx builds it with AMX as well (build-amx/):
# its llama-bench runs here, and decodes Q4_0 and Q8_0 about twice as fast as the build without.
# --llama-bench-avx2 builds one for CPUs without AVX-512 (build-avx2/: GGML_NATIVE off, so ggml's
# AVX, AVX2, FMA, F16C and BMI2 defaults), to compare with brecq run as BRECQ_CPU_ISA=avx2.
set -euo pipefail
dir=${1:?usage: bash bench/llama_cpp_source.sh DIR [--llama-bench | --llama-bench-amx | --llama-bench-avx2]}
python=${PYTHON:-python3}
version=${VERSION:-$("$python" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || true)}
if [ -z "$version" ]; then
  echo "llama-cpp-python is not installed: set VERSION=0.3.36 (or install it)" >&2
  exit 1
fi
mkdir -p "$dir"
sdist="$dir/llama_cpp_python-$version.tar.gz"
if [ ! -f "$sdist" ]; then
  "$python" -m pip download --quiet --no-deps --no-binary :all: -d "$dir" "llama-cpp-python==$version"
fi
tree="$dir/llama_cpp_python-$version/vendor/llama.cpp"
if [ ! -f "$tree/conversion/__init__.py" ]; then
  tar xzf "$sdist" -C "$dir"
fi
tree=$(cd "$tree" && pwd)
native=ON
case "${2:-}" in
  --llama-bench) build=build; flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;;
  --llama-bench-amx) build=build-amx; flags="" ;;
  --llama-bench-avx2) build=build-avx2; flags=""; native=OFF ;;
  "") build="" ;;
  *) echo "unknown option ${2}: expected --llama-bench, --llama-bench-amx or --llama-bench-avx2" >&2; exit 2 ;;
esac
if [ -n "$build" ]; then
  cmake -S "$tree" -B "$tree/$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE="$native" -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    "-DCMAKE_C_FLAGS=$flags" "-DCMAKE_CXX_FLAGS=$flags" >/dev/null
  cmake --build "$tree/$build" --target llama-bench llama-quantize -j"$(nproc)"
  echo "llama-bench: $tree/$build/bin/llama-bench (llama-quantize beside it)"
fi
echo "export BRECQ_LLAMA_CPP_SOURCE=$tree"
