"""Packed GEMV/GEMM against dense torch at the Qwen3-0.6B linear shapes.

Each variant cycles through distinct weight matrices totalling at least FOOTPRINT bytes, so that,
as in a real model, weights come from memory and not from cache. Packed copies sit back to back in
one huge-page region, as ``brecq.quantize`` and ``brecq.load_quantized`` place a model's layers
(brecq_ext.arena); dense ones are torch's own allocations. The read bandwidth is measured on both
kinds of pages, and bench/summarize.py compares against the faster.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import brecq_ext
from brecq_ext import ops
from brecq_ext.arena import place_tensors
from brecq_ext.format import layer_storage
from brecq_ext.layout import to_tile16

from brecq.models import QWEN3_0_6B_LINEAR_SHAPES
from brecq.measurement.speed import in_one_region, random_packed_weights

FOOTPRINT = int(os.environ.get("BRECQ_BENCH_FOOTPRINT_MB", "200")) << 20
GROUP = 64
SHAPES = {"q": QWEN3_0_6B_LINEAR_SHAPES["q_proj"], "kv": QWEN3_0_6B_LINEAR_SHAPES["k_proj"],
          "o": QWEN3_0_6B_LINEAR_SHAPES["o_proj"], "gate_up": QWEN3_0_6B_LINEAR_SHAPES["gate_proj"],
          "down": QWEN3_0_6B_LINEAR_SHAPES["down_proj"]}
ROWS = [1, 8, 512]
# (name, activation dtype, bits or None for dense); "w4t"/"w6t" are in the TILE16 layout that
# QuantLinear uses on AVX-512 CPUs, "w3"/"w4"/"w6" in the row-major layout (docs/FORMAT.md).
KINDS = [("dense_f32", torch.float32, None), ("dense_bf16", torch.bfloat16, None),
         ("w4t_bf16", torch.bfloat16, 4), ("w4_bf16", torch.bfloat16, 4),
         ("w6t_bf16", torch.bfloat16, 6), ("w6_bf16", torch.bfloat16, 6),
         ("w4t_f32", torch.float32, 4), ("w4_f32", torch.float32, 4),
         ("w6t_f32", torch.float32, 6), ("w6_f32", torch.float32, 6),
         ("w3_bf16", torch.bfloat16, 3), ("w3_f32", torch.float32, 3)]  # the AVX-512 bit-stream decoder
# The GEMV kernel alone (the compiled function on raw pointers, no op dispatch or checks).
KERNEL_KINDS = [("w4t_bf16_kernel", torch.bfloat16, 4), ("w4_bf16_kernel", torch.bfloat16, 4),
                ("w6t_bf16_kernel", torch.bfloat16, 6), ("w6_bf16_kernel", torch.bfloat16, 6),
                ("w3_bf16_kernel", torch.bfloat16, 3)]

_pool: dict = {}


def _tiled(name: str) -> bool:
    return name.split("_")[0].endswith("t")


def _weights(shape_name, kind):
    """Distinct weights for one (shape, kind); only the latest pool is kept in memory."""
    key = (shape_name, kind[0].replace("_kernel", ""))
    if key not in _pool:
        _pool.clear()
        k, n = SHAPES[shape_name]
        gen = torch.Generator().manual_seed(0)
        name, dtype, bits = kind
        if bits is None:
            per = n * k * torch.tensor([], dtype=dtype).element_size()
            base = torch.randn(n, k, generator=gen).to(dtype)
            _pool[key] = ([base.clone() for _ in range(max(2, -(-FOOTPRINT // per)))], per)
        else:
            per = layer_storage(n, k, bits, GROUP).total_bytes
            copies = random_packed_weights(n, k, bits, GROUP, max(2, -(-FOOTPRINT // per)), gen)
            if _tiled(name):
                copies = [to_tile16(p, s, z, bits, GROUP, k) for p, s, z in copies]
            _pool[key] = (in_one_region(copies), per)
    return _pool[key]


CASES = [(s, kind, rows) for s in SHAPES for rows in ROWS for kind in KINDS
         + (KERNEL_KINDS if rows == 1 else [])]


@pytest.mark.parametrize("shape_name,kind,rows", CASES,
                         ids=[f"{s}-m{r}-{k[0]}" for s, k, r in CASES])
def test_linear(benchmark, shape_name, kind, rows):
    k, n = SHAPES[shape_name]
    name, dtype, bits = kind
    weights, bytes_per_call = _weights(shape_name, kind)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    state = {"i": 0}

    if bits is None:
        def call():
            state["i"] += 1
            return F.linear(x, weights[state["i"] % len(weights)])
    elif name.endswith("_kernel"):
        from brecq_ext._extension import cpu_kernels

        kernels, y, threads = cpu_kernels(), torch.empty(rows, n, dtype=dtype), torch.get_num_threads()
        pointers = [(p.data_ptr(), s.data_ptr(), z.data_ptr()) for p, s, z in weights]

        def call():
            state["i"] += 1
            p, s, z = pointers[state["i"] % len(pointers)]
            if _tiled(name):
                kernels.tiled_gemv(x.data_ptr(), True, rows, k, p, s, z, 0, n, k, bits, GROUP, y.data_ptr(), True,
                                   threads)
            else:
                kernels.packed_gemv(x.data_ptr(), True, rows, k, p, s, z, 0, n, k, bits, GROUP, y.data_ptr(), True,
                                    threads)
    elif _tiled(name):
        def call():
            state["i"] += 1
            packed, scale, zero = weights[state["i"] % len(weights)]
            return ops.tile16_linear(x, packed, scale, zero, None, bits, GROUP, k, n, weights_checked=True)
    else:
        def call():
            state["i"] += 1
            packed, scale, zero = weights[state["i"] % len(weights)]
            return ops.linear(x, packed, scale, zero, None, bits, GROUP, k, weights_checked=True)

    benchmark.extra_info.update(shape=shape_name, in_features=k, out_features=n, rows=rows, kind=name,
                                weight_bytes=bytes_per_call, threads=torch.get_num_threads(),
                                isa=brecq_ext.cpu_isa(), torch=torch.__version__)
    with torch.inference_mode():
        benchmark.pedantic(call, rounds=60 if rows <= 8 else 6, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("huge_pages", [False, True], ids=["small_pages", "huge_pages"])
def test_read_bandwidth(benchmark, huge_pages):
    """Reference: memory read bandwidth of this machine, as torch reads a large float32 tensor
    (twice the weight footprint, far beyond any cache) on torch's pages or on huge pages."""
    data = torch.rand(FOOTPRINT // 4 * 2)
    if huge_pages:
        data = place_tensors([data])[1][0]
    benchmark.extra_info.update(kind="read_bandwidth_huge_pages" if huge_pages else "read_bandwidth",
                                weight_bytes=data.numel() * 4, threads=torch.get_num_threads())
    with torch.inference_mode():
        benchmark.pedantic(data.sum, rounds=10, iterations=1, warmup_rounds=1)
