"""CUDA benchmarks for a GPU session (run by bench/gpu_check.sh).

1. Device-to-device copy bandwidth (bytes read + written per second), the yardstick of the GEMV.
2. Packed W4/W6 matmul against dense bfloat16 at the Qwen3-0.6B linear shapes (and the
   1024 -> 151936 lm_head) for 1, 4, 16 and 512 rows. Each variant cycles through enough distinct
   weights (>= 256 MiB, at most 128 copies) that they stream from HBM rather than the 50 MB L2, and
   is timed as a CUDA graph of one call per copy, replayed: the GPU time per call that a decode
   step sees when layers run back to back, without Python or launch gaps.
3. Decode of a Qwen3-0.6B-shaped model (seeded random weights), bfloat16 against the study's
   W6 attention / W4 MLP recipe (round-to-nearest; the tied lm_head stays bfloat16) and its
   variants (--models: a W4 lm_head, q/k/v and gate/up fused), eagerly and with a static KV cache
   replayed from a CUDA graph; optionally (section decode_compiled) with the step compiled by
   torch.compile first.

Every timing is a median. The JSON file is rewritten (atomically) after each section, so a run cut
short keeps what it measured; a section that fails records its error and the others still run.

    python bench/gpu_bench.py --out gpu.json [--sections matmul,eager,decode]
    python bench/gpu_bench.py --out gpu.json --merge --sections decode_compiled   # torch.compile'd step
    python bench/gpu_bench.py --out gpu.json --sections decode --models bf16,w4w6,w4w6_fused
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

from brecq.measurement.measure import _cache_keyword, _cache_of, environment, latency, static_decode_latency, storage
from brecq.models import QWEN3_0_6B_LINEAR_SHAPES, build_model, qwen3_config
from brecq.quantization.quantize import quantize
from brecq.quantization.recipe import Method, Recipe, get_recipe
from brecq_ext import LayerRule, fuse_projections_, ops
from brecq_ext.format import layer_storage, num_groups, packed_row_bytes

log = logging.getLogger("gpu_bench")

SHAPES = {name: QWEN3_0_6B_LINEAR_SHAPES[name] for name in ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj")}
SHAPES["lm_head"] = (1024, 151936)
ROWS = (1, 4, 16, 512)
STREAM_BYTES = 256 << 20
MAX_COPIES = 128


def write_json(path: str, data: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def event_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms_per_call(calls: list, replays: int = 10) -> float:
    """GPU time per call of ``calls`` (zero-argument functions) captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls[:2]:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    ms = event_ms(graph.replay, replays)
    del graph
    return ms / len(calls)


def copies_for(nbytes: int) -> int:
    return max(2, min(MAX_COPIES, -(-STREAM_BYTES // nbytes)))


def copy_bandwidth_gbs() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB, far beyond L2
    b = torch.empty_like(a)
    ms = event_ms(lambda: b.copy_(a), repeats=20)
    return 2 * a.numel() / (ms * 1e-3) / 1e9


def random_packed(n: int, k: int, bits: int, copies: int, gen: torch.Generator):
    out = []
    for _ in range(copies):
        packed = torch.randint(0, 256, (n, packed_row_bytes(k, 64, bits)), dtype=torch.uint8, device="cuda",
                               generator=gen)
        scale = (torch.rand(n, num_groups(k, 64), device="cuda", generator=gen) * 0.01 + 1e-3).half()
        zero = torch.randint(0, 1 << bits, (n, num_groups(k, 64)), dtype=torch.uint8, device="cuda", generator=gen)
        out.append((packed, scale, zero))
    return out


# The tensor-core decode kernels, timed side by side: (brecq::cuda::GemvKernel, tuning of mma16).
GEMV_KERNELS = {"mma8": (2, 0), **{f"mma16t{t}": (3, t) for t in range(4)}}


def kernel_calls(copies: list, x: torch.Tensor, n: int, k: int, bits: int, kernel: tuple) -> list:
    """One call per weight copy of the CUDA module's GEMV with a named kernel (not the op's choice)."""
    cuda = ops.cuda_kernels()
    cuda.use_device(x.device.index or 0)
    y = torch.empty(x.shape[0], n, device=x.device, dtype=x.dtype)

    def call(p, s, z):
        cuda.packed_gemv(x.data_ptr(), 1, x.shape[0], x.stride(0), p.data_ptr(), s.data_ptr(), z.data_ptr(), 0, n, k,
                         bits, 64, y.data_ptr(), torch.cuda.current_stream().cuda_stream, *kernel)

    return [lambda p=p, s=s, z=z: call(p, s, z) for p, s, z in copies]


def bench_matmul(result: dict) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_gbs = result["copy_bandwidth_gbs"]
    result["matmul"] = []
    for name, (k, n) in SHAPES.items():
        dense_copies = copies_for(n * k * 2)
        dense = [torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(dense_copies)]
        packed = {}
        for bits in (4, 6):
            nbytes = layer_storage(n, k, bits, 64).total_bytes
            packed[bits] = random_packed(n, k, bits, copies_for(nbytes), gen)
        for rows in ROWS:
            x = torch.randn(rows, k, device="cuda", generator=gen, dtype=torch.bfloat16)
            row = {"shape": name, "in": k, "out": n, "rows": rows, "dense_copies": dense_copies}
            # Default arguments bind each call's tensors now (the graph is captured inside this loop).
            row["dense_bf16_ms"] = graph_ms_per_call([lambda w=w, x=x: F.linear(x, w) for w in dense])
            row["dense_bf16_gbs"] = n * k * 2 / (row["dense_bf16_ms"] * 1e-3) / 1e9
            for bits in (4, 6):
                calls = [lambda p=p, s=s, z=z, x=x, bits=bits, k=k: ops.packed_matmul(x, p, s, z, None, bits, 64, k)
                         for p, s, z in packed[bits]]
                ms = graph_ms_per_call(calls)
                nbytes = layer_storage(n, k, bits, 64).total_bytes
                row[f"w{bits}_copies"] = len(calls)
                row[f"w{bits}_ms"] = ms
                row[f"w{bits}_gbs"] = nbytes / (ms * 1e-3) / 1e9
                row[f"w{bits}_fraction_of_copy"] = row[f"w{bits}_gbs"] / copy_gbs
                row[f"w{bits}_speedup_vs_bf16"] = row["dense_bf16_ms"] / ms
            if rows <= 16:
                for bits in (4, 6):
                    row[f"w{bits}_kernel_ms"] = {name: graph_ms_per_call(kernel_calls(packed[bits], x, n, k, bits, kernel))
                                                 for name, kernel in GEMV_KERNELS.items()}
            result["matmul"].append(row)
            log.info("%s", json.dumps(row))
        del dense, packed
        torch.cuda.empty_cache()


def eager_call_us(result: dict) -> None:
    """Wall-clock time of one eager call (Python + dispatch + kernel) at 1 row, per path."""
    from brecq_ext import QuantLinear

    k, n = QWEN3_0_6B_LINEAR_SHAPES["gate_proj"]
    linear = torch.nn.Linear(k, n, bias=False, device="cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    quantized = QuantLinear.from_linear(linear, 4, 64)
    layers = {"dense_bf16": linear.to(torch.bfloat16), "quant_linear_w4": quantized}
    out = {}
    with torch.no_grad():
        for label, layer in layers.items():
            for _ in range(20):
                layer(x)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(200):
                layer(x)
            torch.cuda.synchronize()
            out[label] = (time.perf_counter() - start) / 200 * 1e6
    result["eager_call_us_gate_proj_1row"] = out
    log.info("eager call us: %s", out)


@torch.no_grad()
def kernel_time_profile(model, steps: int = 4) -> dict:
    """GPU kernel time of ``steps`` eager decode steps after a 64-token prompt, per kernel name
    (the ten largest) and in total, from torch.profiler: where a decode step's GPU time goes."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (1, 64), device="cuda")
    keyword = _cache_keyword(model)
    out = model(ids, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            out = model(token, use_cache=True, **{keyword: _cache_of(out)})
            token = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
    kernels = [(e.key, e.device_time_total) for e in prof.key_averages() if e.device_time_total > 0]
    kernels.sort(key=lambda item: -item[1])
    total = sum(t for _, t in kernels)
    return {"us_per_step_total": total / steps,
            "top": [{"kernel": name[:90], "us_per_step": t / steps} for name, t in kernels[:10]]}


DECODE_MODELS = ("bf16", "w4w6", "w4w6_head4", "w4w6_fused", "w4w6_head4_fused")


def decode_models(labels) -> dict:
    """The decode sections' models on the GPU, keyed by label (``labels``, from DECODE_MODELS).

    ``w4w6`` is the study's recipe (the tied lm_head stays bfloat16). ``w4w6_head4`` adds a W4 g64
    lm_head: its 1024 -> 151936 call is the largest of a decode step, and the CUDA GEMV takes 4 and
    6 bits only, so not the CPU benchmark's 8-bit head. ``_fused`` has q/k/v and gate/up fused
    (brecq_ext.fuse_projections_): four packed matmuls per decoder layer instead of seven."""
    study = get_recipe("w4g64_mix_attn6", Method.RTN)
    recipes = {"w4w6": study,
               "w4w6_head4": Recipe("w4g64_mix_attn6_head4", (*study.rules, LayerRule(r"^lm_head$", 4, 64)),
                                    method=Method.RTN)}
    base = build_model(qwen3_config("0.6b"), seed=0).to("cuda")  # float32 on the GPU: the quantizer's input
    models = {}
    for label in labels:
        if label == "bf16":
            models[label] = copy.deepcopy(base).to(torch.bfloat16).eval()
            continue
        model = copy.deepcopy(base)
        quantize(model, recipes[label.removesuffix("_fused")], show_progress=False)
        if label.endswith("_fused"):
            fuse_projections_(model)
        models[label] = model.to(torch.bfloat16).eval()  # norms, embeddings; QuantLinear buffers keep dtypes
    del base
    torch.cuda.empty_cache()
    return models


def bench_decode(result: dict, prompt: int, tokens: int, labels) -> None:
    started = time.perf_counter()
    models = decode_models(labels)
    result["decode_models_build_and_rtn_s"] = time.perf_counter() - started
    dense = models["bf16"]
    decode = {}
    for label, model in models.items():
        decode[label] = {"weight_bytes": storage(model).weight_bytes}
        eager = latency(model, prompt_tokens=prompt, decode_tokens=tokens)
        decode[label]["eager"] = eager.__dict__
        log.info("%s eager: %.3f ms/token", label, eager.decode_ms_per_token_median)
        graphed = static_decode_latency(model, prompt_tokens=prompt, decode_tokens=tokens, use_graph=True)
        decode[label]["cuda_graph"] = graphed.__dict__
        log.info("%s static cache + CUDA graph: %.3f ms/token", label, graphed.decode_ms_per_token_median)
        result["decode"] = decode
    # Eager decode is bound by the host; timing bf16 again after the quantized models shows how far
    # the host's speed drifted between the measurements.
    decode["bf16"]["eager_repeat"] = latency(dense, prompt_tokens=prompt, decode_tokens=tokens).__dict__
    log.info("bf16 eager again: %.3f ms/token", decode["bf16"]["eager_repeat"]["decode_ms_per_token_median"])
    for label in models:
        if label == "bf16":
            continue
        for mode in ("eager", "cuda_graph"):
            decode[f"speedup_{mode}" + ("" if label == "w4w6" else f"_{label}")] = (
                decode["bf16"][mode]["decode_ms_per_token_median"] / decode[label][mode]["decode_ms_per_token_median"])
    log.info("decode speed-up: eager %.2fx, CUDA graph %.2fx", decode["speedup_eager"], decode["speedup_cuda_graph"])
    decode["gpu_kernel_time"] = {label: kernel_time_profile(model) for label, model in models.items()}


def bench_decode_compiled(result: dict, prompt: int, tokens: int, labels) -> None:
    """Decode with the step compiled by torch.compile (inductor: the model's element-wise and
    normalisation kernels fused) and replayed from a CUDA graph, bf16 against the quantized models."""
    models = decode_models(labels)
    compiled = {}
    for label, model in models.items():
        started = time.perf_counter()
        report = static_decode_latency(model, prompt_tokens=prompt, decode_tokens=tokens, use_graph=True,
                                       compile_backend="inductor")
        compiled[label] = {**report.__dict__, "seconds_with_compilation": time.perf_counter() - started}
        log.info("%s compiled + CUDA graph: %.3f ms/token", label, report.decode_ms_per_token_median)
        result["decode_compiled"] = compiled
        torch._dynamo.reset()  # each model compiles afresh; no recompile limit shared between them
    bf16 = compiled["bf16"]["decode_ms_per_token_median"]
    for label in models:
        if label != "bf16":
            compiled["speedup" + ("" if label == "w4w6" else f"_{label}")] = (
                bf16 / compiled[label]["decode_ms_per_token_median"])
    log.info("compiled decode speed-up %.2fx", compiled["speedup"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu.json")
    parser.add_argument("--sections", default="matmul,eager,decode")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--models", default="bf16,w4w6,w4w6_head4",
                        help=f"decode sections' models, comma-separated, from {','.join(DECODE_MODELS)}")
    parser.add_argument("--merge", action="store_true", help="add to the results already in --out")
    args = parser.parse_args()
    models = args.models.split(",")
    if set(models) - set(DECODE_MODELS) or not {"bf16", "w4w6"} <= set(models):
        parser.error(f"--models: bf16, w4w6 and any of {','.join(DECODE_MODELS[2:])}, got {args.models}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device("cuda")
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            result = json.load(f)
        result.setdefault("errors", {})
    else:
        result = {"environment": environment(device, torch.bfloat16), "copy_bandwidth_gbs": copy_bandwidth_gbs(),
                  "errors": {}}
    log.info("copy bandwidth %.0f GB/s", result["copy_bandwidth_gbs"])
    write_json(args.out, result)
    sections = {"matmul": lambda: bench_matmul(result), "eager": lambda: eager_call_us(result),
                "decode": lambda: bench_decode(result, args.prompt, args.tokens, models),
                "decode_compiled": lambda: bench_decode_compiled(result, args.prompt, args.tokens, models)}
    for name in args.sections.split(","):
        started = time.perf_counter()
        try:
            sections[name]()
        except Exception:  # noqa: BLE001 - record and go on: one broken section must not lose the rest
            result["errors"][name] = traceback.format_exc()
            log.error("section %s failed:\n%s", name, result["errors"][name])
        result[f"{name}_seconds"] = time.perf_counter() - started
        write_json(args.out, result)


if __name__ == "__main__":
    main()
