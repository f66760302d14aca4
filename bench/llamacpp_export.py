"""The same quantized model run by brecq and by llama.cpp from its ``brecq export --format gguf``
file, on the CPU, side by side: prefill and decode speed, and next-token agreement.

The model is Qwen3-0.6B-shaped with seeded random weights held in bfloat16 (as the real model
ships), a byte-level BPE tokenizer trained on ../shared/data (the real Qwen3 vocabulary cannot be
fetched here: its embedding rows past our 1,024 tokens are padding), quantized with a study recipe
by round to nearest. The rounding method does not change the file's format, bytes or speed; for
quality figures see tests/test_export.py and docs/QUALITY.md.

brecq runs as the study measures it (bfloat16 activations, brecq_sdpa decode attention, fused
RMSNorm, packed weights in one region); llama.cpp (llama-cpp-python) with the same thread count.
Each repeat runs both prefills, then alternates single decode steps of the two in random order, so
the machine's drift falls on both alike. Medians with min-max over repeats; /proc/loadavg before
and after.

    python bench/llamacpp_export.py [--recipe w4g64_mix_attn6_head8] [--prompts 128 512] [--tokens 32]
                                    [--repeats 3] [--layers 28] [--json bench/results/llamacpp_export.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("brecq.bench")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def build(workdir: Path, recipe: str, layers: int) -> tuple[Path, Path]:
    from brecq import Method, get_recipe, quantize_pretrained
    from brecq.export import export_gguf
    from brecq.models import build_model, byte_level_bpe_tokenizer, qwen3_config

    text = (SHARED / "tinystories_val_head.txt").read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split("\n\n") if s.strip()]
    fp = workdir / "fp"
    tokenizer = byte_level_bpe_tokenizer(stories, 1024, fp)
    config = qwen3_config("0.6b", num_hidden_layers=layers, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = build_model(config, seed=0).to(torch.bfloat16)  # the real model's precision
    model.save_pretrained(str(fp))
    del model
    started = time.perf_counter()
    quantize_pretrained(str(fp), str(workdir / "q"), get_recipe(recipe, Method.RTN), show_progress=False)
    log.info("quantized in %.0f s", time.perf_counter() - started)
    report = export_gguf(workdir / "q", workdir / "model.gguf")
    log.info("exported: %.1f MB", report.total_bytes / 1e6)
    return workdir / "q", workdir / "model.gguf"


def brecq_model(path: Path):
    import brecq
    from brecq.attention import use_decode_attention

    from brecq_ext import fuse_rms_norms_

    model = brecq.load_quantized(path).to(torch.bfloat16).eval()
    use_decode_attention(model)
    fuse_rms_norms_(model)
    return model


def measure(model, llm, prompt: int, tokens: int, repeats: int, seed: int = 0) -> dict:
    """Interleaved prefill and decode timings of brecq (``model``) and llama.cpp (``llm``)."""
    from brecq.measurement.measure import _cache_keyword, _cache_of

    vocab = 1024
    ids = torch.randint(3, vocab, (1, prompt), generator=torch.Generator().manual_seed(seed))
    order = random.Random(seed)
    keyword = _cache_keyword(model)
    times = {name: {"prefill": [], "steps": []} for name in ("brecq", "llama.cpp")}
    for run in range(repeats + 1):  # the first is a warm-up
        state = {}
        for name in order.sample(list(times), 2):
            started = time.perf_counter()
            if name == "brecq":
                out = model(ids, use_cache=True, logits_to_keep=1)
                state[name] = (_cache_of(out), out.logits[:, -1:].argmax(-1))
            else:
                llm.reset()
                llm.eval(ids[0].tolist())
                state[name] = int(llm.scores[llm.n_tokens - 1].argmax())
            if run:
                times[name]["prefill"].append(time.perf_counter() - started)
        for _ in range(tokens):
            for name in order.sample(list(times), 2):
                started = time.perf_counter()
                if name == "brecq":
                    cache, token = state[name]
                    out = model(token, use_cache=True, **{keyword: cache})
                    state[name] = (_cache_of(out), out.logits[:, -1:].argmax(-1))
                else:
                    llm.eval([state[name]])
                    state[name] = int(llm.scores[llm.n_tokens - 1].argmax())
                if run:
                    times[name]["steps"].append(time.perf_counter() - started)
    result = {}
    for name, t in times.items():
        prefill = [1e3 * x for x in t["prefill"]]
        steps = [1e3 * x for x in t["steps"]]
        result[name] = {"prefill_ms_median": statistics.median(prefill), "prefill_ms_range": [min(prefill), max(prefill)],
                        "prefill_tokens_per_s": 1e3 * prompt / statistics.median(prefill),
                        "decode_ms_median": statistics.median(steps),
                        "decode_ms_p10_p90": [sorted(steps)[len(steps) // 10], sorted(steps)[9 * len(steps) // 10]],
                        "decode_tokens_per_s": 1e3 / statistics.median(steps)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="w4g64_mix_attn6_head8")
    parser.add_argument("--prompts", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--tokens", type=int, default=32, help="decode steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import llama_cpp
    from brecq.export.llamacpp import open_llama
    from brecq.io import atomic_write_text
    from brecq.measurement.measure import environment

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        qdir, gguf_path = build(Path(tmp), args.recipe, args.layers)
        gguf_bytes = os.path.getsize(gguf_path)
        model = brecq_model(qdir)
        llm = open_llama(gguf_path, n_ctx=max(args.prompts) + args.tokens + 8, n_threads=args.threads,
                         logits_all=False)
        result = {"recipe": args.recipe, "layers": args.layers, "threads": args.threads, "tokens": args.tokens,
                  "repeats": args.repeats, "gguf_bytes": gguf_bytes, "llama_cpp_python": llama_cpp.__version__,
                  "environment": environment(torch.device("cpu"), torch.bfloat16), "loadavg_before": loadavg(),
                  "prompts": {}}
        with torch.inference_mode():
            for prompt in args.prompts:
                result["prompts"][str(prompt)] = measure(model, llm, prompt, args.tokens, args.repeats)
        result["loadavg_after"] = loadavg()
    print(f"{args.recipe}, {args.layers} layers, {args.threads} threads, GGUF {gguf_bytes / 1e6:.0f} MB; "
          f"loadavg {result['loadavg_before']} -> {result['loadavg_after']}\n")
    print("| prompt | runtime | prefill tok/s | prefill ms (min-max) | decode ms/token (p10-p90) | decode tok/s |")
    print("|---:|---|---:|---:|---:|---:|")
    for prompt, runs in result["prompts"].items():
        for name, r in runs.items():
            print(f"| {prompt} | {name} | {r['prefill_tokens_per_s']:.0f} | {r['prefill_ms_median']:.0f} "
                  f"({r['prefill_ms_range'][0]:.0f}-{r['prefill_ms_range'][1]:.0f}) | {r['decode_ms_median']:.1f} "
                  f"({r['decode_ms_p10_p90'][0]:.1f}-{r['decode_ms_p10_p90'][1]:.1f}) | "
                  f"{r['decode_tokens_per_s']:.1f} |")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
