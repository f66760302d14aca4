"""How far the AVX-512 integer-activation GEMV (docs/CPU.md) moves a real model's decode, set
beside the gap between two exact float kernels that differ only in summation order.

stories260k (../shared/models/stories260k), quantized by round to nearest with each recipe, in
bfloat16, decodes 200 tokens of ../shared/data/tinystories_val_head.txt one at a time (teacher
forced, KV cache: every linear takes the GEMV path). Logits are compared across kernels run on the
same quantized layers:

* integer: TILE16 layers on AVX-512 (4- and 8-bit layers take integer activations, 6-bit floats);
* scalar: the same TILE16 layers through the portable float kernel (BRECQ_CPU_ISA=scalar);
* rows: the layers rearranged row-major, on the AVX-512 float kernel (exact products, another
  summation order): the size of a difference that is only float rounding;
* fp32: the float32 model (float32 activations, float kernels): the cost of bfloat16 itself.

    python bench/cpu_numerics_stories260k.py [--recipes w4g64 w4g64_mix_attn6_head8] [--tokens 200]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

import brecq_ext
from brecq.quantization.quantize import quantize
from brecq.quantization.recipe import Method, get_recipe

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "models" / "stories260k"
TEXT = ROOT.parent / "shared" / "data" / "tinystories_val_head.txt"


def decode_logits(model, ids: torch.Tensor, isa: str) -> torch.Tensor:
    """float32 logits [T, vocab] of a teacher-forced decode, one token a step, on CPU ISA ``isa``."""
    previous = brecq_ext.set_cpu_isa(isa)
    try:
        cache = transformers.DynamicCache()
        steps = []
        with torch.no_grad():
            for t in range(ids.shape[1]):
                out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                steps.append(out.logits[0, -1].float())
        return torch.stack(steps)
    finally:
        brecq_ext.set_cpu_isa(previous)


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict:
    log_p, log_q = reference.log_softmax(-1), other.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {"max_logit_diff": (reference - other).abs().max().item(), "mean_kl": kl.mean().item(),
            "max_kl": kl.max().item(), "argmax_agree": (reference.argmax(-1) == other.argmax(-1)).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", default=["w4g64", "w4g64_mix_attn6_head8"])
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()
    isa = brecq_ext.cpu_isa()
    if not isa.startswith("avx512"):
        raise SystemExit(f"needs the AVX-512 kernels; this machine runs {isa}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(MODEL))
    ids = tokenizer(TEXT.read_text()[: 5 * args.tokens], return_tensors="pt").input_ids[:, : args.tokens]

    print("| recipe | pair | max abs logit diff | mean KL | max KL | argmax agree |")
    print("|---|---|---:|---:|---:|---:|")
    for recipe in args.recipes:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32).eval()
        quantize(model, get_recipe(recipe, Method.RTN), show_progress=False)
        fp32 = decode_logits(model, ids, isa)
        model = model.to(torch.bfloat16)
        integer = decode_logits(model, ids, isa)
        scalar = decode_logits(model, ids, "scalar")
        for layer in model.modules():
            if isinstance(layer, brecq_ext.QuantLinear):
                layer.use_layout(brecq_ext.Layout.ROWS)
        rows = decode_logits(model, ids, isa)
        for pair, (a, b) in {"integer vs scalar": (scalar, integer), "rows vs scalar": (scalar, rows),
                             "fp32 vs scalar": (fp32, scalar)}.items():
            c = compare(a, b)
            print(f"| {recipe} | {pair} | {c['max_logit_diff']:.3f} | {c['mean_kl']:.2e} | {c['max_kl']:.2e} "
                  f"| {c['argmax_agree']:.3f} |")


if __name__ == "__main__":
    main()
