"""brecq against the field's quantizers on one model, one calibration text, one held-out text.

    python bench/peers.py [--model stories260k|trained|DIR] [--recipes w4g64_mix_attn6 w4g64 w3g64] [--iters 800]
                          [--llmcompressor-python .venv-llmc/bin/python]

Every row is scored by the same code on the same held-out windows (256 tokens, no overlap):
perplexity, mean KL(full precision || quantized) per token, top-1 agreement with the full-precision
model, and the bits per weight the method stores for the decoder blocks' linear layers (scales,
zeros and mins counted; layers a method leaves unquantized counted at 16 bits). Embeddings and the
head stay in full precision in every row, so only the blocks are compared: for llama.cpp's files
the token embeddings / output matrix it quantized are put back to full precision after reading.

Methods, each skipped with a note when its package is missing:

* brecq RTN, GPTQ and BRECQ with the recipe (asymmetric, group 64, MSE clipping);
* AutoRound (``auto-round``): same bits, group size and asymmetry per layer (``layer_config`` for
  the W6 attention of the mixed recipe), its default 200 iterations, float32 (``amp=False``), the
  same calibration documents (its own tokenization and windows);
* llama.cpp's quantizer (``llama-cpp-python``): ``llama_model_quantize`` to Q4_0, Q4_1, Q4_K_M and
  Q8_0 from the full-precision GGUF, read back with the ``gguf`` package's dequantizers; Q4_0, Q4_1
  and Q4_K_M also with an importance matrix from the calibration text (llama.cpp's search through
  ``brecq.kquants``, as ``llama-quantize --imatrix`` applies one; Q8_0's quantizer takes none);
* llm-compressor's GPTQ and AWQ (``--llmcompressor-python``): its releases pin transformers and
  compressed-tensors versions brecq's environment does not share, so it runs in a second venv
  (``python3 -m venv .venv-llmc && .venv-llmc/bin/pip install torch==2.13.0 llmcompressor``) as
  ``bench/peers_llmcompressor.py``, on brecq's calibration windows and the recipe's bits and groups;
  the dequantized weights it writes are scored here. Its scales are counted at 16 bits (its packed
  checkpoint stores them in the model's dtype: bfloat16 for a bfloat16 model).

Only some methods: ``--methods brecq autoround llmcompressor llamacpp``; with ``--merge`` their rows
replace or join those of an earlier run's JSON (which keeps every row's per-window NLL and KL).

Calibration: the first half of ../shared/data/tinystories_val_head.txt; held-out: the second half.
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
from bench_models import trained_model

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260k"
TEXT = ROOT.parent / "shared" / "data" / "tinystories_val_head.txt"
LLAMA_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q4_K_M": 15, "Q8_0": 7}
# llama.cpp's Q8_0 quantizer takes no importance matrix (its scale is the block's largest magnitude)
IMATRIX_TYPES = ("Q4_0", "Q4_1", "Q4_K_M")
METHODS = ("brecq", "autoround", "llmcompressor", "llamacpp")


def block_linears(model):
    """The decoder blocks' linear layers, dense or packed."""
    from brecq.quantization.blocks import decoder_blocks

    from brecq_ext import QuantLinear

    return [m for block in decoder_blocks(model) for m in block.modules() if isinstance(m, (torch.nn.Linear, QuantLinear))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stories260k")
    parser.add_argument("--recipes", nargs="*", default=["w4g64_mix_attn6", "w4g64", "w3g64"])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--iters", type=int, default=800, help="BRECQ iterations a block")
    parser.add_argument("--autoround-iters", type=int, default=200)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--llmcompressor-python", default=os.environ.get("BRECQ_LLMCOMPRESSOR_PYTHON"),
                        help="interpreter of a venv with llmcompressor (default $BRECQ_LLMCOMPRESSOR_PYTHON)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an earlier run's JSON (same model, calibration and held-out text) "
                             "and replace or add only the rows of --methods")
    parser.add_argument("--workdir")
    parser.add_argument("--json", help="default bench/results/peers_<model>.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from brecq.quantization.calibration import CalibrationSpec, build_calibration, load_documents
    from brecq.evaluation.fidelity import fidelity
    from brecq.evaluation.perplexity import perplexity, token_stream
    from brecq.quantization.quantize import quantize
    from brecq.quantization.recipe import Method, get_recipe
    from brecq.quantization.reconstruct import ReconstructionConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from brecq_ext import QuantLinear

    work = Path(args.workdir or tempfile.mkdtemp(prefix="brecq-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    docs = load_documents(TEXT)
    half = len(docs) // 2
    model_dir = {"stories260k": STORIES, "trained": None}.get(args.model, Path(args.model))
    if model_dir is None:
        model_dir = trained_model(work / "trained", docs[:half])
    calib_file = work / "calibration.txt"
    calib_file.write_text("\n\n".join(docs[:half]))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calibration = CalibrationSpec(str(calib_file), args.samples, args.seq_len, seed=0)
    calib_ids = build_calibration(tokenizer, calibration)
    eval_ids = token_stream(tokenizer, docs[half:])

    def load():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    reference = load()
    rows: dict[str, dict] = {}
    per_window: dict[str, tuple] = {}  # per-window NLL and KL of each row, for the paired comparisons
    skipped: dict[str, str] = {}
    results_path = Path(args.json or ROOT / "bench" / "results" / f"peers_{Path(str(args.model)).name}.json")
    setting = {"model": str(args.model), "eval_tokens": int(eval_ids.numel()), "calibration": calibration.describe()}
    if args.merge and results_path.exists():
        earlier = json.loads(results_path.read_text())
        if any(earlier.get(key) != value for key, value in setting.items()):
            raise SystemExit(f"--merge: {results_path} was made with another model, calibration or held-out text")
        rows = earlier["rows"]
        per_window = {label: (row["window_nll"], row["window_kl"]) for label, row in rows.items() if "window_nll" in row}

    def score(label, model, bits_per_weight, seconds, **extra):
        model = model.float().eval()
        ppl = perplexity(model, eval_ids)
        fid = fidelity(model, reference, eval_ids)
        rows[label] = {"bits_per_weight": bits_per_weight, "perplexity": ppl.perplexity, "mean_kl": fid.mean_kl,
                       "top1_agreement": fid.top1_agreement, "seconds": seconds, **extra}
        print(json.dumps({label: rows[label]}), file=sys.stderr, flush=True)
        per_window[label] = (ppl.window_nll, fid.window_kl)
        rows[label].update(window_nll=list(ppl.window_nll), window_kl=list(fid.window_kl))

    def group_bits(layer, bits, group):
        """Codes plus a 16-bit scale and a packed zero point per group: what AutoRound's and
        llm-compressor's packed checkpoints store for an asymmetric grouped layer."""
        n = layer.in_features * layer.out_features
        return n * bits + layer.out_features * -(-layer.in_features // group) * (16 + bits)

    for recipe_name in args.recipes:
        for method in (Method.RTN, Method.GPTQ, Method.BRECQ) if "brecq" in args.methods else ():
            model = load()
            recipe = get_recipe(recipe_name, method)
            started = time.perf_counter()
            quantize(model, recipe, None if method is Method.RTN else calib_ids,
                     reconstruction=ReconstructionConfig(iters=args.iters), show_progress=False)
            seconds = time.perf_counter() - started
            layers = block_linears(model)
            stored = sum(layer.memory_bytes() * 8 if isinstance(layer, QuantLinear) else 16 * layer.weight.numel()
                         for layer in layers)
            weights = sum(layer.in_features * layer.out_features for layer in layers)
            score(f"{recipe_name} brecq {method.value}", model, stored / weights, seconds)

        if "autoround" not in args.methods:
            pass
        elif importlib.util.find_spec("auto_round") is None:
            skipped["AutoRound"] = "auto-round is not installed (pip install auto-round)"
        else:
            from auto_round import AutoRound

            recipe = get_recipe(recipe_name, Method.RTN)
            model = load()
            layer_config = {name: {"bits": rule.bits, "group_size": rule.group_size, "sym": False}
                             for name, rule in recipe.assign(model).items()}
            main_rule = next(iter(layer_config.values()))
            # brecq's own calibration windows, token for token (as a DataLoader of input_ids).
            windows = torch.utils.data.DataLoader([{"input_ids": row} for row in calib_ids], batch_size=8)
            started = time.perf_counter()
            rounder = AutoRound(model, tokenizer, bits=main_rule["bits"], group_size=main_rule["group_size"],
                                sym=False, dataset=windows, iters=args.autoround_iters, seqlen=args.seq_len,
                                nsamples=args.samples, batch_size=8, layer_config=layer_config, device_map="cpu",
                                amp=False, seed=0)
            quantized, _ = rounder.quantize()
            seconds = time.perf_counter() - started
            names = {id(m): n for n, m in quantized.named_modules()}
            original = dict(reference.named_parameters())
            stored = weights = 0
            left = []
            for layer in block_linears(quantized):
                name = names[id(layer)]
                n = layer.in_features * layer.out_features
                # A layer it left alone still holds the original weights.
                if not torch.equal(layer.weight.float(), original[name + ".weight"]):
                    # its auto_round export: packed codes, float16 scale and packed zero per group
                    stored += group_bits(layer, layer_config[name]["bits"], layer_config[name]["group_size"])
                else:
                    stored += 16 * n
                    left.append(name)
                weights += n
            score(f"{recipe_name} AutoRound", quantized, stored / weights, seconds,
                  left_unquantized=sorted({n.split(".")[-1] for n in left}))

        if "llmcompressor" not in args.methods:
            pass
        elif not args.llmcompressor_python:
            skipped["llm-compressor"] = ("no --llmcompressor-python: llm-compressor needs its own venv "
                                         "(python3 -m venv .venv-llmc && .venv-llmc/bin/pip install "
                                         "torch==2.13.0 llmcompressor)")
        else:
            from safetensors.torch import load_file

            recipe = get_recipe(recipe_name, Method.RTN)
            layer_rules = {name: {"bits": rule.bits, "group_size": rule.group_size}
                           for name, rule in recipe.assign(reference).items()}
            (work / "layers.json").write_text(json.dumps(layer_rules))
            torch.save(calib_ids, work / "calibration_ids.pt")
            for peer in ("gptq", "awq"):
                out = work / f"llmcompressor_{recipe_name}_{peer}.safetensors"
                command = [args.llmcompressor_python, str(ROOT / "bench" / "peers_llmcompressor.py"),
                           "--model", str(model_dir), "--calibration", str(work / "calibration_ids.pt"),
                           "--layers", str(work / "layers.json"), "--method", peer, "--out", str(out)]
                started = time.perf_counter()
                done = subprocess.run(command, check=False, capture_output=True, text=True)
                seconds = time.perf_counter() - started
                if done.returncode != 0:
                    skipped[f"{recipe_name} llm-compressor {peer}"] = (
                        done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
                    continue
                info = json.loads(out.with_suffix(".json").read_text())
                model = load()
                state = load_file(str(out))
                own = model.state_dict()
                if set(state) != set(own):
                    raise SystemExit(f"llm-compressor {peer} wrote other tensors: {sorted(set(state) ^ set(own))[:5]}")
                model.load_state_dict(state)
                modules = dict(model.named_modules())
                stored = sum(group_bits(modules[n], layer_rules[n]["bits"], layer_rules[n]["group_size"])
                             for n in info["quantized"])
                stored += sum(16 * modules[n].in_features * modules[n].out_features for n in info["ignored"])
                weights = sum(m.in_features * m.out_features for m in block_linears(model))
                score(f"{recipe_name} llm-compressor {peer.upper()}", model, stored / weights, info["seconds"],
                      left_unquantized=sorted({n.split(".")[-1] for n in info["ignored"]}),
                      seconds_with_startup=seconds)

    if "llamacpp" not in args.methods:
        pass
    elif importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None:
        skipped["llama.cpp"] = "llama-cpp-python or gguf is not installed (pip install 'brecq[export,llamacpp]')"
    else:
        import gguf
        from brecq.export import export_gguf_full_precision
        from brecq.export.llamacpp import llama_quantize
        from brecq.kquants import load_gguf_weights, quantize_gguf

        fp = work / "fp.gguf"
        export_gguf_full_precision(model_dir, fp)
        files = {}
        for name, ftype in LLAMA_TYPES.items():
            out = work / f"{name}.gguf"
            started = time.perf_counter()
            llama_quantize(fp, out, ftype, torch.get_num_threads())
            files[f"llama.cpp {name}"] = (out, time.perf_counter() - started)
        for name in IMATRIX_TYPES:
            started = time.perf_counter()
            quantize_gguf(model_dir, work / f"{name}-imatrix.gguf", preset=name, method="rtn", importance=True,
                          calibration=calibration, show_progress=False)
            files[f"llama.cpp {name} + imatrix"] = (work / f"{name}-imatrix.gguf", time.perf_counter() - started)
        for label, (path, seconds) in files.items():
            model = load()
            types = load_gguf_weights(model, path)
            embed = model.get_input_embeddings().weight
            embed.data.copy_(reference.get_input_embeddings().weight)  # blocks only, as the other rows
            head = model.get_output_embeddings()
            if head is not None and head.weight is not embed:
                head.weight.data.copy_(reference.get_output_embeddings().weight)
            names = {id(m): n for n, m in model.named_modules()}
            stored = weights = 0
            kinds = set()
            for layer in block_linears(model):
                kind = types[names[id(layer)] + ".weight"]  # the GGUF type load_gguf_weights read it as
                block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
                stored += 8 * layer.weight.numel() // block * block_bytes
                weights += layer.weight.numel()
                kinds.add(kind)
            score(label, model, stored / weights, seconds, types=sorted(kinds))

    paired = paired_with_brecq(rows, per_window, args.recipes)
    summary = {**setting, "full_precision_perplexity": perplexity(reference, eval_ids).perplexity, "iters": args.iters,
               "threads": torch.get_num_threads(), "loadavg_end": os.getloadavg(), "skipped": skipped,
               "command": "python bench/peers.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
               "rows": rows, "paired_with_brecq": paired}
    results_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = results_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, results_path)
    print(f"{args.model}: full precision perplexity {summary['full_precision_perplexity']:.4f} on "
          f"{summary['eval_tokens']} tokens\n")
    print("| method | bits/weight (blocks) | perplexity | mean KL | top-1 agreement | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in sorted(rows.items(), key=lambda kv: kv[1]["bits_per_weight"]):
        print(f"| {label} | {r['bits_per_weight']:.3f} | {r['perplexity']:.4f} | {r['mean_kl']:.5f} | "
              f"{r['top1_agreement']:.4f} | {r['seconds']:.1f} |")
    if paired:
        print("\nEach row against brecq BRECQ of its recipe (llama.cpp's files against the study recipe's), "
              "paired over the same held-out windows: mean of (row - BRECQ) per window, bootstrap 95 % interval. "
              "An interval that excludes 0 is a difference this text resolves.\n")
        print("| method | against | NLL difference (nats/token) | KL difference (nats/token) |")
        print("|---|---|---:|---:|")
        for label, p in paired.items():
            nll, kl = p["nll_difference"], p["kl_difference"]
            print(f"| {label} | {p['against']} | {nll[0]:+.5f} ({nll[1]:+.5f} to {nll[2]:+.5f}) | "
                  f"{kl[0]:+.5f} ({kl[1]:+.5f} to {kl[2]:+.5f}) |")
    for name, why in skipped.items():
        print(f"\nskipped {name}: {why}")


def paired_with_brecq(rows: dict, windows: dict, recipes: list[str]) -> dict:
    """Every row against the BRECQ row of its recipe on the same windows (perplexity and KL are
    window means of per-token values, so the windows pair two rows): mean difference and its
    bootstrap 95 % interval."""
    from brecq.evaluation.metrics import paired_bootstrap_difference

    study = f"{recipes[0]} brecq brecq" if recipes else None
    paired = {}
    for label in rows:
        recipe = next((r for r in recipes if label.startswith(r + " ")), None)
        against = f"{recipe} brecq brecq" if recipe else study
        if against not in windows or label == against:
            continue
        entry = {"against": against}
        for key, index in (("nll_difference", 0), ("kl_difference", 1)):
            mean, (lo, hi) = paired_bootstrap_difference(windows[against][index], windows[label][index])
            entry[key] = [mean, lo, hi]
        paired[label] = entry
    return paired


if __name__ == "__main__":
    main()
