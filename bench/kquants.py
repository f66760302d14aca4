"""BRECQ rounding in llama.cpp's own block types against llama.cpp's quantizer, same file types.

    python bench/kquants.py [--model stories260k|trained|seeded|DIR] [--preset Q4_K_M] [--iters 400]

For one model and one llama-quantize type map (Q4_K_M by default), every row is a GGUF file with
the same tensor types, read back into the same PyTorch model (``brecq.kquants.load_gguf_weights``)
and evaluated with the same code on the same held-out text:

* ``llama-quantize``: ``llama_cpp.llama_model_quantize`` on the full-precision GGUF;
* ``llama-quantize + imatrix``: llama.cpp's search weighted by an importance matrix computed by
  brecq from the calibration text (``quantize_gguf(method=rtn, importance=True)``; llama.cpp's own
  ``llama-imatrix`` tool is not in the Python package, so it is not run);
* ``brecq BRECQ``: the same scales and mins as each of those, the codes learned block by block;
* ``AutoRound gguf:<preset>`` (``--llama-cpp-source DIR``): AutoRound's own GGUF k-quant export on the
  same calibration windows, at 0 iterations (what AutoRound recommends for GGUF) and at its default 200
  (``bench/autoround_gguf.py``, in a subprocess: it needs a llama.cpp source tree, see there).

Columns: bits per weight of the quantized matrices as stored (scales and mins counted), perplexity,
mean KL(full precision || quantized) per token, top-1 agreement with the full-precision model,
seconds to quantize. ``--model stories260k`` is a real pretrained model (its 64-wide rows take
llama.cpp's fallbacks: Q5_0/Q8_0, and its 172-wide down_proj F16); ``--model seeded`` is a seeded
Qwen3-shaped model whose rows 256-blocks divide: it shows the pipeline on real K-quant types, its
quality numbers mean nothing; ``--model trained`` is a small Qwen3 trained on the calibration half
(``brecq.models.stories_model``, 600 steps), whose 256-wide rows take real K-types. Calibration and held-out text: the two halves of
../shared/data/tinystories_val_head.txt.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_models import seeded_model, trained_model

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260k"
TEXT = ROOT.parent / "shared" / "data" / "tinystories_val_head.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stories260k")
    parser.add_argument("--preset", default="Q4_K_M")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--eval-tokens", type=int, default=60000)
    parser.add_argument("--llama-cpp-source", default=os.environ.get("BRECQ_LLAMA_CPP_SOURCE"),
                        help="llama.cpp source tree for AutoRound's GGUF export (default $BRECQ_LLAMA_CPP_SOURCE)")
    parser.add_argument("--autoround-iters", type=int, nargs="*", default=[0, 200])
    parser.add_argument("--workdir")
    parser.add_argument("--json", default=None, help="default bench/results/kquants_<model>_<preset>.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    try:
        import llama_cpp  # noqa: F401 (checked here, used through brecq.export.llamacpp)
    except ImportError:
        raise SystemExit("bench/kquants.py compares with llama.cpp: pip install 'brecq[llamacpp]'") from None
    from brecq.quantization.calibration import CalibrationSpec, load_documents
    from brecq.evaluation.fidelity import fidelity
    from brecq.evaluation.perplexity import perplexity, token_stream
    from brecq.export import export_gguf_full_precision
    from brecq.export.llamacpp import llama_quantize
    from brecq.kquants import get_preset, load_gguf_weights, quantize_gguf
    from brecq.quantization.reconstruct import ReconstructionConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="brecq-kquants-"))
    work.mkdir(parents=True, exist_ok=True)
    docs = load_documents(TEXT)
    half = len(docs) // 2
    model_dir = {"stories260k": STORIES, "seeded": None, "trained": None}.get(args.model, Path(args.model))
    if model_dir is None:
        model_dir = (seeded_model(work / "seeded", docs[:half]) if args.model == "seeded"
                     else trained_model(work / "trained", docs[:half]))
    calib_file = work / "calibration.txt"
    calib_file.write_text("\n\n".join(docs[:half]))
    calibration = CalibrationSpec(str(calib_file), args.samples, args.seq_len, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eval_ids = token_stream(tokenizer, docs[half:])[:args.eval_tokens]

    def load():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    reference = load()
    fp_ppl = perplexity(reference, eval_ids).perplexity
    files = {}
    seconds = {}
    preset = get_preset(args.preset)
    fp_gguf = work / "fp.gguf"
    export_gguf_full_precision(model_dir, fp_gguf)
    started = time.perf_counter()
    files["llama-quantize"] = work / "llama.gguf"
    llama_quantize(fp_gguf, files["llama-quantize"], preset.llama_ftype, torch.get_num_threads())
    seconds["llama-quantize"] = time.perf_counter() - started
    reconstruction = ReconstructionConfig(iters=args.iters)
    runs = [("llama-quantize + imatrix", "rtn", True), ("brecq BRECQ (llama.cpp scales)", "brecq", False),
            ("brecq BRECQ (llama.cpp imatrix scales)", "brecq", True)]
    for label, method, importance in runs:
        path = work / f"{method}_{int(importance)}.gguf"
        started = time.perf_counter()
        quantize_gguf(model_dir, path, preset=args.preset, method=method, importance=importance,
                      calibration=calibration, reconstruction=reconstruction, show_progress=False)
        seconds[label] = time.perf_counter() - started
        files[label] = path
        print(f"{label}: {seconds[label]:.0f} s", file=sys.stderr, flush=True)

    skipped = {}
    if importlib.util.find_spec("auto_round") is None:
        skipped["AutoRound"] = "auto-round is not installed"
    elif not args.llama_cpp_source:
        skipped["AutoRound"] = "no --llama-cpp-source (AutoRound's GGUF export needs llama.cpp's conversion code)"
    else:
        from brecq.quantization.calibration import build_calibration

        torch.save(build_calibration(tokenizer, calibration), work / "calibration_ids.pt")
        for iters in args.autoround_iters:
            label = f"AutoRound gguf:{args.preset.lower()} ({iters} iterations)"
            path = work / f"autoround_{iters}.gguf"
            command = [sys.executable, str(ROOT / "bench" / "autoround_gguf.py"), "--model", str(model_dir),
                       "--calibration", str(work / "calibration_ids.pt"), "--scheme", f"gguf:{args.preset.lower()}",
                       "--iters", str(iters), "--llama-cpp-source", args.llama_cpp_source, "--out", str(path)]
            done = subprocess.run(command, check=False, capture_output=True, text=True)
            if done.returncode != 0:
                skipped[label] = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
                continue
            files[label] = path
            seconds[label] = json.loads(path.with_suffix(".json").read_text())["seconds"]
            print(f"{label}: {seconds[label]:.0f} s", file=sys.stderr, flush=True)

    import gguf
    rows = {}
    for label, path in files.items():
        model = load()
        types = load_gguf_weights(model, path)
        stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) == 2}
        weights = sum(int(t.n_elements) for t in stored.values())
        bpw = 8.0 * sum(int(t.n_bytes) for t in stored.values()) / weights
        ppl = perplexity(model, eval_ids).perplexity
        fid = fidelity(model, reference, eval_ids)
        rows[label] = {"bits_per_weight": bpw, "perplexity": ppl, "mean_kl": fid.mean_kl,
                       "top1_agreement": fid.top1_agreement, "seconds": seconds[label],
                       "types": sorted(set(types.values()))}
        print(json.dumps({label: rows[label]}), file=sys.stderr, flush=True)

    out = Path(args.json or ROOT / "bench" / "results" / f"kquants_{Path(str(args.model)).name}_{args.preset}.json")
    summary = {"model": str(args.model), "preset": args.preset, "full_precision_perplexity": fp_ppl,
               "eval_tokens": int(eval_ids.numel()), "calibration": calibration.describe(),
               "iters": args.iters, "threads": torch.get_num_threads(), "loadavg_end": os.getloadavg(),
               "command": "python bench/kquants.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
               "skipped": skipped, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{args.model}, {args.preset} type map; full precision perplexity {fp_ppl:.4f} on {eval_ids.numel()} "
          "tokens\n")
    print("| file | bits/weight | perplexity | mean KL | top-1 agreement | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        print(f"| {label} | {r['bits_per_weight']:.3f} | {r['perplexity']:.4f} | {r['mean_kl']:.5f} | "
              f"{r['top1_agreement']:.4f} | {r['seconds']:.0f} |")
    for name, why in skipped.items():
        print(f"\nskipped {name}: {why}")


if __name__ == "__main__":
    main()
