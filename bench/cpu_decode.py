"""End-to-end decode on the CPU of a Qwen3-0.6B-shaped model (seeded random weights): bfloat16
against the study's recipe (W6 attention, W4 MLP, group 64, round to nearest; the lm_head stays
bfloat16, tied to the embeddings) and against that recipe with an 8-bit lm_head (preset
w4g64_mix_attn6_head8; the embedding table stays bfloat16 beside it), the latter also with q/k/v
and gate/up fused ("w4w6_head8_fused", brecq_ext.fuse_projections_). On AVX-512 CPUs the recipe
also runs with its 4-bit layers held row-major ("w4w6_rows") beside the TILE16 layout that
QuantLinear picks there (brecq_ext.layout), and with its packed weights as separate allocations
("w4w6_scattered") beside the one huge-page region that ``quantize`` gathers them into
(brecq_ext.arena). Timed side by side with
``brecq.measurement.measure.paired_latency`` (steps of all models interleaved in random order, so the machine's
drift falls on all alike). Writes JSON and prints a small table.

With ``--attention``, bf16 and w4w6_head8 also run with ``attn_implementation="brecq_sdpa"``
("bf16_brecq_attn", "w4w6_head8_brecq_attn": decode steps through brecq_ext's decode-attention
kernel instead of torch's SDPA), in the same interleaved measurement. ``--norms`` adds them once
more with their RMSNorm modules fused as well ("..._brecq_attn_norms", brecq_ext.fuse_rms_norms_).

With ``--static``, it then times bf16, w4w6_head8 and w4w6_head8_fused again with a static KV
cache (``brecq.measurement.measure.StaticDecoder``), each eagerly and with the step compiled by torch.compile
(inductor), all decoders taking turns by repeat.

    python bench/cpu_decode.py [--prompt 32] [--tokens 16] [--repeats 3] [--attention] [--norms] [--static]
                               [--json bench/results/cpu_decode.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time

import torch

from brecq_ext import Layout, fuse_projections_, fuse_rms_norms_, quant_linear_layers

from brecq.attention import use_decode_attention
from brecq.io import atomic_write_text
from brecq.measurement.measure import StaticDecoder, environment, paired_latency, storage
from brecq.models import build_model, qwen3_config
from brecq.quantization.quantize import quantize
from brecq.quantization.recipe import Method, get_recipe

log = logging.getLogger("brecq.bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (prefill)")
    parser.add_argument("--tokens", type=int, default=16, help="decoded tokens per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention", action="store_true",
                        help="also time bf16 and w4w6_head8 with attn_implementation='brecq_sdpa'")
    parser.add_argument("--norms", action="store_true",
                        help="also time bf16 and w4w6_head8 with brecq_sdpa and fused RMSNorm modules")
    parser.add_argument("--static", action="store_true",
                        help="also time static-cache decode, eager and torch.compile'd (minutes of compilation)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    started = time.perf_counter()
    base = build_model(qwen3_config("0.6b"), seed=0)  # float32: the quantizer's input
    models = {"bf16": copy.deepcopy(base).to(torch.bfloat16).eval()}
    build_s = time.perf_counter() - started
    quantize_s = {}
    for label, recipe in (("w4w6", "w4g64_mix_attn6"), ("w4w6_head8", "w4g64_mix_attn6_head8")):
        model = copy.deepcopy(base)
        started = time.perf_counter()
        quantize(model, get_recipe(recipe, Method.RTN), show_progress=False)
        quantize_s[label] = time.perf_counter() - started
        models[label] = model.to(torch.bfloat16).eval()  # norms, embeddings; QuantLinear buffers keep dtypes
    del base
    models["w4w6_head8_fused"] = copy.deepcopy(models["w4w6_head8"])
    fuse_projections_(models["w4w6_head8_fused"])  # q/k/v and gate/up: 4 calls per layer, not 7
    models["w4w6_scattered"] = copy.deepcopy(models["w4w6"])
    for _, layer in quant_linear_layers(models["w4w6_scattered"]):  # one allocation per buffer, as before
        for name, buffer in list(layer.named_buffers(recurse=False)):
            setattr(layer, name, buffer.clone())
    if any(layer.layout is Layout.TILE16 for _, layer in quant_linear_layers(models["w4w6"])):
        models["w4w6_rows"] = copy.deepcopy(models["w4w6"])
        for _, layer in quant_linear_layers(models["w4w6_rows"]):
            layer.use_layout(Layout.ROWS)
    if args.attention:
        for label in ("bf16", "w4w6_head8"):
            models[f"{label}_brecq_attn"] = use_decode_attention(copy.deepcopy(models[label]))
    if args.norms:
        for label in ("bf16", "w4w6_head8"):
            models[f"{label}_brecq_attn_norms"] = use_decode_attention(copy.deepcopy(models[label]))
            fuse_rms_norms_(models[f"{label}_brecq_attn_norms"])
    log.info("built in %.0f s, quantized (RTN) in %s", build_s, {k: round(v) for k, v in quantize_s.items()})

    with torch.inference_mode():
        reports = paired_latency(models, prompt_tokens=args.prompt, decode_tokens=args.tokens,
                                 repeats=args.repeats)
    result = {"environment": environment(torch.device("cpu"), torch.bfloat16), "prompt_tokens": args.prompt,
              "decode_tokens": args.tokens, "repeats": args.repeats, "rtn_quantize_s": quantize_s,
              "models": {label: {"weight_bytes": storage(model).weight_bytes, **reports[label].__dict__}
                         for label, model in models.items()}}
    dense = reports["bf16"]
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}; prompt {args.prompt}, "
          f"{args.tokens} tokens x {args.repeats} repeats, steps interleaved\n")
    print("| model | weights MiB | prefill ms | decode ms/token (median) | p90 | tokens/s | decode vs bf16 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, report in reports.items():
        mib = result["models"][label]["weight_bytes"] / 2**20
        speedup = dense.decode_ms_per_token_median / report.decode_ms_per_token_median
        result["models"][label]["decode_speedup_vs_bf16"] = speedup
        print(f"| {label} | {mib:.0f} | {report.prefill_ms:.0f} | {report.decode_ms_per_token_median:.1f} | "
              f"{report.decode_ms_per_token_p90:.1f} | {report.tokens_per_second:.1f} | {speedup:.2f}x |")
    if args.static:
        labels = ("bf16", "w4w6_head8", "w4w6_head8_fused")
        result["static_cache"] = static_cache_decode({k: models[k] for k in labels}, args.prompt, args.tokens,
                                                     max(args.repeats, 6))
        print("\n| model | static cache, eager: ms/token (median) | p90 | compiled (inductor): ms/token | p90 |")
        print("|---|---:|---:|---:|---:|")
        for label in labels:
            eager, compiled = result["static_cache"][f"{label} eager"], result["static_cache"][f"{label} compiled"]
            print(f"| {label} | {eager['median_ms']:.1f} | {eager['p90_ms']:.1f} | {compiled['median_ms']:.1f} | "
                  f"{compiled['p90_ms']:.1f} |")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))


@torch.no_grad()
def static_cache_decode(models: dict, prompt: int, tokens: int, repeats: int) -> dict:
    """Per-token decode time with a static KV cache, eager and compiled, for each model: all the
    decoders are built (and compiled) first, then take turns, one prefill and ``tokens`` steps each
    per repeat. Returns "<label> eager|compiled" -> median_ms, p90_ms, compile_s."""
    ids = torch.randint(0, 1000, (1, prompt), generator=torch.Generator().manual_seed(0))
    decoders, compile_s = {}, {}
    for label, model in models.items():
        for mode, backend in (("eager", None), ("compiled", "inductor")):
            name = f"{label} {mode}"
            decoders[name] = StaticDecoder(model, prompt + tokens + 4, use_graph=False, compile_backend=backend)
            started = time.perf_counter()
            decoders[name].step(decoders[name].prefill(ids))  # compiles the compiled one
            compile_s[name] = time.perf_counter() - started
            log.info("%s ready in %.0f s", name, compile_s[name])
    steps = {name: [] for name in decoders}
    for _ in range(repeats):
        for name, decoder in decoders.items():
            token = decoder.prefill(ids)
            for _ in range(tokens):
                started = time.perf_counter()
                token = decoder.step(token)
                steps[name].append(time.perf_counter() - started)
    return {name: {"median_ms": statistics.median(times) * 1e3,
                   "p90_ms": sorted(times)[int(0.9 * (len(times) - 1))] * 1e3, "compile_s": compile_s[name]}
            for name, times in steps.items()}


if __name__ == "__main__":
    main()
