"""AutoRound's GGUF k-quant export (``gguf:q4_k_m`` and the like) on one model, for bench/kquants.py.

    python bench/autoround_gguf.py --model DIR --calibration ids.pt --scheme gguf:q4_k_m --iters 0 \
        --llama-cpp-source LLAMA_CPP_DIR --out file.gguf

AutoRound writes GGUF through llama.cpp's own conversion code. The conversion it bundles (auto-round
0.16) needs a ``gguf`` package newer than PyPI's 0.19.0 (it reads ``MODEL_ARCH.DFLASH``), so this file
runs with a llama.cpp source tree's ``gguf-py`` first on the path and AutoRound pointed at that tree's
``conversion/`` (``LLAMA_CPP_ROOT``). The llama.cpp tree vendored in llama-cpp-python's sdist works:
``pip download --no-deps --no-binary :all: llama-cpp-python`` and unpack ``vendor/llama.cpp``.
bench/kquants.py starts this file in a subprocess with that environment.

The conversion refuses tokenizers whose pre-tokenizer it does not know by hash (bench models have
their own); the bench reads only the weights back, so the pre-tokenizer is named "gpt-2" here.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--calibration", required=True, type=Path, help="torch.save'd [n, seq] int64 token ids")
    parser.add_argument("--scheme", default="gguf:q4_k_m")
    parser.add_argument("--iters", type=int, default=0, help="AutoRound recommends 0 for GGUF k-quants")
    parser.add_argument("--llama-cpp-source", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    source = args.llama_cpp_source.resolve()
    if not (source / "conversion" / "__init__.py").is_file() or not (source / "gguf-py" / "gguf").is_dir():
        raise SystemExit(f"--llama-cpp-source: {source} has no conversion/ and gguf-py/ (a llama.cpp source tree)")
    if "gguf" in sys.modules:
        raise SystemExit("gguf was imported before its llama.cpp copy could be put first on the path")
    sys.path.insert(0, str(source / "gguf-py"))
    os.environ["LLAMA_CPP_ROOT"] = str(source)

    import auto_round.export.export_to_gguf.llama_cpp_conversion as conversion_loader
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_conversion = conversion_loader._import_conversion_from

    def load_conversion_any_tokenizer(root, label):
        context = load_conversion(root, label)
        sys.modules["conversion.base"].TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
        return context

    conversion_loader._import_conversion_from = load_conversion_any_tokenizer

    ids = torch.load(args.calibration)
    if ids.dtype != torch.int64 or ids.dim() != 2:
        raise SystemExit(f"--calibration: expected a [n, seq] int64 tensor, got {tuple(ids.shape)} {ids.dtype}")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    windows = torch.utils.data.DataLoader([{"input_ids": row} for row in ids], batch_size=8)
    work = args.out.parent / (args.out.stem + ".autoround")
    started = time.perf_counter()
    rounder = AutoRound(model, tokenizer, scheme=args.scheme, dataset=windows, iters=args.iters,
                        seqlen=ids.shape[1], nsamples=ids.shape[0], batch_size=8, device_map="cpu", amp=False,
                        seed=0)
    rounder.quantize_and_save(str(work), format=args.scheme)
    seconds = time.perf_counter() - started
    written = sorted(work.rglob("*.gguf"))
    if len(written) != 1:
        raise SystemExit(f"AutoRound wrote {len(written)} GGUF files under {work}, expected one")
    os.replace(written[0], args.out)
    args.out.with_suffix(".json").write_text(json.dumps({"seconds": seconds, "iters": args.iters}) + "\n")


if __name__ == "__main__":
    main()
