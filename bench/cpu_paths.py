"""Small CPU timings behind design choices of the packed-matmul paths (medians, variants of a
section timed round-robin in random order so that the machine's drift hits them alike):

1. per-call cost of a tiny layer (8x64, W4): the compiled kernel on raw pointers, ``ops.linear``,
   ``QuantLinear`` (on ``[1, 64]`` and on transformers' ``[1, 1, 64]``) and dense bfloat16
   ``F.linear``: the Python and dispatch overhead of each path;
2. ``dequantize_packed`` of a 2048x1024 layer, W4/W6, to float32/bfloat16 (the GEMM path's
   workspace);
3. a W4 layer through ``ops.linear`` against dense float32 at 32, 100 and 256 rows (prefill);
4. the two product forms of a dequantized tile, x . W^T (F.linear) and W . x^T (mm into a
   transposed output), at 9, 64 and 512 rows, float32 and bfloat16.

    python bench/cpu_paths.py
"""
from __future__ import annotations

import random
import statistics
import time

import torch
import torch.nn.functional as F

from brecq.measurement.speed import random_packed_weights
from brecq_ext import QuantLinear, ops
from brecq_ext._extension import cpu_kernels


def interleaved_us(variants: dict, rounds: int) -> dict:
    times = {name: [] for name in variants}
    names, order = list(variants), random.Random(0)
    for fn in variants.values():
        fn(0)
    for i in range(rounds):
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            variants[name](i)
            times[name].append(time.perf_counter() - start)
    return {name: 1e6 * statistics.median(t) for name, t in times.items()}


def show(title: str, result: dict) -> None:
    print(f"{title}: " + ", ".join(f"{name} {us:.1f} us" for name, us in result.items()), flush=True)


def main() -> None:
    kernels = cpu_kernels()
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    print(f"threads {threads}, torch {torch.__version__}")
    with torch.inference_mode():
        # 1. per-call cost
        x = torch.randn(1, 64, generator=gen).bfloat16()
        x3 = x.view(1, 1, 64)
        (p, s, z), = random_packed_weights(8, 64, 4, 64, 1, gen)
        y = torch.empty(1, 8, dtype=torch.bfloat16)
        dense = torch.randn(8, 64, generator=gen).bfloat16()
        layer = QuantLinear.from_linear(torch.nn.Linear(64, 8, bias=False), 4, 64)
        show("1. tiny layer, one call", interleaved_us({
            "kernel": lambda i: kernels.packed_gemv(x.data_ptr(), True, 1, 64, p.data_ptr(), s.data_ptr(),
                                                    z.data_ptr(), 0, 8, 64, 4, 64, y.data_ptr(), True, threads),
            "ops.linear": lambda i: ops.linear(x, p, s, z, None, 4, 64, 64, weights_checked=True),
            "QuantLinear": lambda i: layer(x),
            "QuantLinear [1, 1, 64]": lambda i: layer(x3),
            "F.linear bf16": lambda i: F.linear(x, dense),
        }, 2000))

        # 2. dequantization
        layers = {bits: random_packed_weights(2048, 1024, bits, 64, 1, gen)[0] for bits in (4, 6)}
        show("2. dequantize_packed 2048x1024", interleaved_us({
            f"W{bits} {str(dtype)[6:]}": (lambda i, bits=bits, dtype=dtype: ops.dequantize_packed(
                *layers[bits], bits, 64, 1024, dtype))
            for bits in (4, 6) for dtype in (torch.float32, torch.bfloat16)}, 30))

        # 3. prefill-sized products
        for rows in (32, 100, 256):
            for k, n in ((1024, 3072), (3072, 1024)):
                xs = torch.randn(rows, k, generator=gen)
                w = torch.randn(n, k, generator=gen)
                packed = random_packed_weights(n, k, 4, 64, 1, gen)[0]
                r = interleaved_us({"dense f32": lambda i: F.linear(xs, w),
                                    "W4": lambda i: ops.linear(xs, *packed, None, 4, 64, k, weights_checked=True)},
                                   15)
                show(f"3. {rows} rows {k}->{n} (W4 {r['dense f32'] / r['W4']:.2f}x dense speed)", r)

        # 4. product forms of a dequantized tile
        for rows in (9, 64, 512):
            for dtype in (torch.float32, torch.bfloat16):
                xs = torch.randn(rows, 1024, generator=gen).to(dtype)
                tile = torch.randn(1024, 1024, generator=gen).to(dtype)
                out_t = torch.empty(1024, rows, dtype=dtype)
                r = interleaved_us({
                    "x.W^T": lambda i: F.linear(xs, tile),
                    "W.x^T": lambda i: torch.mm(tile, xs.t(), out=out_t).t().contiguous(),
                }, 40 if rows < 512 else 10)
                show(f"4. {rows} rows {str(dtype)[6:]} (x.W^T {r['W.x^T'] / r['x.W^T']:.2f}x the speed of W.x^T)", r)


if __name__ == "__main__":
    main()
