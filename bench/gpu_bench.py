"""CUDA benchmarks for a GPU session (run by bench/gpu_check.sh): packed W4/W6 matmul against dense
bfloat16 at the Qwen3-0.6B linear shapes for 1, 4, 16 and 512 rows, device-to-device copy
bandwidth, and end-to-end decode tokens/s of a Qwen3-0.6B-shaped model (bfloat16 vs W6/W4, eager).
Writes one JSON file; every number is a median of CUDA-event timings after warm-up.

    python bench/gpu_bench.py --out gpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from brecq.measure import environment, latency
from brecq.models import QWEN3_0_6B_LINEAR_SHAPES, build_model, qwen3_config
from brecq.quantize import quantize
from brecq.recipe import Method, get_recipe
from brecq.speed import random_packed_weights
from brecq_ext import ops
from brecq_ext.format import layer_storage


def cuda_time_ms(fn, repeats: int = 50, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB
    b = torch.empty_like(a)
    ms = cuda_time_ms(lambda: b.copy_(a), repeats=20)
    return 2 * a.numel() / (ms * 1e-3) / 1e9  # read + write


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu.json")
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    result = {"environment": environment(device, torch.bfloat16), "copy_bandwidth_gbs": copy_bandwidth_gbs(),
              "matmul": []}
    copies = 8  # distinct weights cycled so that they are read from HBM, not L2
    for name, (k, n) in QWEN3_0_6B_LINEAR_SHAPES.items():
        if name == "v_proj" or name == "up_proj":
            continue  # same shapes as k_proj and gate_proj
        dense = [torch.randn(n, k, generator=gen).to(device=device, dtype=torch.bfloat16) for _ in range(copies)]
        packed = {bits: [tuple(t.to(device) for t in w) for w in random_packed_weights(n, k, bits, 64, copies, gen)]
                  for bits in (4, 6)}
        for rows in (1, 4, 16, 512):
            x = torch.randn(rows, k, generator=gen).to(device=device, dtype=torch.bfloat16)
            state = {"i": 0}

            def dense_call():
                state["i"] += 1
                F.linear(x, dense[state["i"] % copies])

            row = {"shape": name, "in": k, "out": n, "rows": rows, "dense_bf16_ms": cuda_time_ms(dense_call)}
            for bits in (4, 6):
                def packed_call(bits=bits):
                    state["i"] += 1
                    p, s, z = packed[bits][state["i"] % copies]
                    ops.packed_matmul(x, p, s, z, None, bits, 64, k)

                ms = cuda_time_ms(packed_call)
                nbytes = layer_storage(n, k, bits, 64).total_bytes
                row[f"w{bits}_ms"] = ms
                row[f"w{bits}_gbs"] = nbytes / (ms * 1e-3) / 1e9
                row[f"w{bits}_fraction_of_copy"] = row[f"w{bits}_gbs"] / result["copy_bandwidth_gbs"]
                row[f"w{bits}_speedup_vs_bf16"] = row["dense_bf16_ms"] / ms
            result["matmul"].append(row)
            print(json.dumps(row), flush=True)
    if not args.skip_e2e:
        model = build_model(qwen3_config("0.6b"), seed=0, dtype=torch.bfloat16).to(device)
        result["decode_bf16"] = latency(model, prompt_tokens=128, decode_tokens=64).__dict__
        model = model.float().cpu()
        quantize(model, get_recipe("w4g64_mix_attn6", Method.RTN), show_progress=False)
        model = model.to(device=device)
        for name, p in model.named_parameters():
            p.data = p.data.to(torch.bfloat16)
        result["decode_w4w6"] = latency(model, prompt_tokens=128, decode_tokens=64).__dict__
        result["decode_speedup"] = (result["decode_bf16"]["decode_ms_per_token_median"]
                                    / result["decode_w4w6"]["decode_ms_per_token_median"])
        print(json.dumps({k: result[k] for k in ("decode_speedup",)}))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
