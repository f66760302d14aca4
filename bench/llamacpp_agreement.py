"""How closely llama.cpp reproduces brecq from a ``brecq export --format gguf`` file: tokenization
on 100 held-out texts and next-token logits on 40 more (top-1 agreement, mean and largest KL, and
brecq's top-2 margin where the two disagree), for stories260k quantized with BRECQ and for small
models of each supported architecture (trained briefly on TinyStories, round to nearest).

    python bench/llamacpp_agreement.py [--iters 200] [--json bench/results/llamacpp_agreement.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def agreement(quantized: Path, gguf_path: Path, texts: list[str], add_bos: bool) -> dict:
    import brecq
    from brecq.export.llamacpp import compare_logits, llama_tokenize, open_llama
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(quantized)
    llm = open_llama(gguf_path, extra_buffer_types=False)
    same = sum(llama_tokenize(llm, t, add_bos) == tokenizer(t)["input_ids"] for t in texts[-100:])
    sequences = [tokenizer(t)["input_ids"][:256] for t in texts[:40]]
    result = compare_logits(brecq.load_quantized(quantized), llm, sequences).to_dict()
    return {"tokenization_identical": f"{same}/100", **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=200, help="BRECQ iterations per block (stories260k)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from brecq import Method, get_recipe, quantize_pretrained
    from brecq.quantization.calibration import CalibrationSpec
    from brecq.export import export_gguf
    from brecq.io import atomic_write_text
    from brecq.models import stories_model
    from brecq.quantization.reconstruct import ReconstructionConfig

    text_file = SHARED / "data" / "tinystories_val_head.txt"
    stories = [s.strip() for s in text_file.read_text(encoding="utf-8").split("\n\n") if s.strip()]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # stories260k with BRECQ: calibration on the first 400 stories, checks on the others.
        (tmp / "calibration.txt").write_text("\n\n".join(stories[:400]), encoding="utf-8")
        calibration = CalibrationSpec(str(tmp / "calibration.txt"), num_samples=32, seq_len=256, seed=0)
        quantize_pretrained(str(SHARED / "models" / "stories260k"), str(tmp / "s"), get_recipe("w4g64_mix_attn6"),
                            calibration, reconstruction=ReconstructionConfig(iters=args.iters), show_progress=False)
        report = export_gguf(tmp / "s", tmp / "s.gguf")
        results["stories260k BRECQ w4g64_mix_attn6"] = {
            "gguf_max_error_steps": report.max_error_steps(), **agreement(tmp / "s", tmp / "s.gguf", stories[400:], True)}
        for model_type in ("qwen3", "qwen2", "llama", "mistral"):
            stories_model(tmp / model_type, stories[:400], model_type)
            quantize_pretrained(str(tmp / model_type), str(tmp / f"{model_type}q"),
                                get_recipe("w4g64_mix_attn6", Method.RTN), show_progress=False)
            report = export_gguf(tmp / f"{model_type}q", tmp / f"{model_type}.gguf")
            results[f"{model_type} (small, trained) RTN w4g64_mix_attn6"] = {
                "gguf_max_error_steps": report.max_error_steps(),
                **agreement(tmp / f"{model_type}q", tmp / f"{model_type}.gguf", stories[400:], False)}
    print("| model | tokenization | top-1 | mean KL (nats) | max KL | max margin at a flip | Q4_1 error (steps) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['tokenization_identical']} | {100 * r['top1']:.2f} % | {r['mean_kl']:.2e} | "
              f"{r['max_kl']:.2e} | {r['max_margin_at_disagreement']:.3f} | {r['gguf_max_error_steps']:.4f} |")
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
