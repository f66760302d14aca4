"""Quality of RTN, GPTQ and BRECQ on a real pretrained model (stories260k), as perplexity.

Calibration: the first half of ../shared/data/tinystories_val_head.txt (documents split at blank
lines, in file order); perplexity: the second half, windows of 256 tokens.

    python bench/quality_stories260k.py [--samples 64] [--seq-len 256] [--json bench/results/quality.json]

Prints a markdown table (the one in docs/QUALITY.md) and writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from brecq.quantization.calibration import CalibrationSpec, build_calibration, load_documents
from brecq.evaluation.perplexity import perplexity, token_stream
from brecq.quantization.quantize import quantize
from brecq.quantization.recipe import Method, get_recipe
from brecq.quantization.reconstruct import LossKind, ReconstructionConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "models" / "stories260k"
TEXT = ROOT.parent / "shared" / "data" / "tinystories_val_head.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--iters", type=int, default=ReconstructionConfig().iters)
    parser.add_argument("--loss", default="mse", choices=["mse", "fisher"])
    parser.add_argument("--methods", nargs="*", default=["rtn", "gptq", "brecq"])
    parser.add_argument("--recipes", nargs="*", default=["w4g64_mix_attn6", "w4g64", "w3g64"])
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "quality_stories260k.json"))
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    docs = load_documents(TEXT)
    half = len(docs) // 2
    eval_ids = token_stream(tokenizer, docs[half:])
    with tempfile.TemporaryDirectory() as tmp:
        calib_file = Path(tmp) / "calibration.txt"
        calib_file.write_text("\n\n".join(docs[:half]))
        calib = build_calibration(tokenizer, CalibrationSpec(str(calib_file), args.samples, args.seq_len, seed=0))

    def load():
        return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()

    fp = perplexity(load(), eval_ids)
    rows = {"fp": {"perplexity": fp.perplexity, "tokens": fp.tokens}}
    lines = [f"FP perplexity {fp.perplexity:.4f} on {fp.tokens} tokens", "",
             "| recipe | method | perplexity | increase over FP | vs RTN increase | seconds |",
             "|---|---|---:|---:|---:|---:|"]
    for recipe_name in args.recipes:
        increases = {}
        for method in [Method(m) for m in ["rtn"] + [m for m in args.methods if m != "rtn"]]:
            model = load()
            started = time.perf_counter()
            quantize(model, get_recipe(recipe_name, method), calib,
                     reconstruction=ReconstructionConfig(iters=args.iters, loss=LossKind(args.loss)),
                     show_progress=False)
            seconds = time.perf_counter() - started
            ppl = perplexity(model, eval_ids).perplexity
            increases[method] = ppl - fp.perplexity
            ratio = increases[method] / increases[Method.RTN] if increases[Method.RTN] > 0 else float("nan")
            rows[f"{recipe_name}/{method.value}"] = {"perplexity": ppl, "increase": increases[method],
                                                     "ratio_to_rtn": ratio, "seconds": seconds}
            lines.append(f"| {recipe_name} | {method.value} | {ppl:.4f} | +{increases[method]:.4f} | "
                         f"{ratio:.2f} | {seconds:.1f} |")
            print(lines[-1], flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"settings": vars(args), "results": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
