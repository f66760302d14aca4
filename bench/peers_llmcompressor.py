"""llm-compressor's GPTQ or AWQ on one model, for bench/peers.py; runs in llm-compressor's own environment.

    PYTHON_LLMC -m pip install torch==2.13.0 llmcompressor      # a second venv: see bench/peers.py
    PYTHON_LLMC bench/peers_llmcompressor.py --model DIR --calibration ids.pt --layers layers.json \
        --method gptq|awq --out result.safetensors

llm-compressor pins transformers and compressed-tensors versions that brecq's environment does not
share, so bench/peers.py runs this file in a subprocess under another interpreter and scores what it
writes with its own code. Input: the model folder, brecq's calibration windows (a [n, seq] int64
tensor saved with torch.save) and a JSON map ``{layer name: {"bits": b, "group_size": g}}`` (the
recipe's per-layer choice). Output: a safetensors file with the model's full state dict after
quantization, each quantized linear's weight replaced by its dequantized value (AWQ also rescales the
norms and the layers before the ones it smooths, so every tensor is written), and beside it
``<out>.json``: seconds, the layers quantized and the layers left in full precision with the reason.

Layers whose in_features the group size does not divide are put in ``ignore``: llm-compressor
refuses them (``group_size_validation``), and ignoring them is what it tells its users to do.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--calibration", required=True, type=Path, help="torch.save'd [n, seq] int64 token ids")
    parser.add_argument("--layers", required=True, type=Path, help="JSON {name: {bits, group_size}}")
    parser.add_argument("--method", required=True, choices=("gptq", "awq"))
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if not torch.accelerator.is_available():
        # AWQ pins its cached activations for faster host-to-device copies, which raises
        # "Cannot access accelerator device" on a machine without one; pinning changes no value.
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    ids = torch.load(args.calibration)
    if ids.dtype != torch.int64 or ids.dim() != 2:
        raise SystemExit(f"--calibration: expected a [n, seq] int64 tensor, got {tuple(ids.shape)} {ids.dtype}")
    layers = json.loads(args.layers.read_text())
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    modules = dict(model.named_modules())
    ignored = {name: f"in_features {modules[name].in_features} not a multiple of group {rule['group_size']}"
               for name, rule in layers.items() if modules[name].in_features % rule["group_size"]}
    by_rule: dict[tuple[int, int], list[str]] = {}
    for name, rule in layers.items():
        if name not in ignored:
            by_rule.setdefault((rule["bits"], rule["group_size"]), []).append(name)
    config_groups = {
        f"group_{i}": QuantizationScheme(
            targets=names,
            weights=QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group))
        for i, ((bits, group), names) in enumerate(sorted(by_rule.items()))}
    ignore = ["lm_head", *ignored]
    if args.method == "gptq":
        recipe = [GPTQModifier(config_groups=config_groups, ignore=ignore)]
    else:
        recipe = [AWQModifier(), QuantizationModifier(config_groups=config_groups, ignore=ignore)]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})

    started = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - started

    state = {}
    quantized = []
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is not None and scheme.weights is not None and hasattr(module, "weight_scale"):
                zero = getattr(module, "weight_zero_point", None)
                state[name + ".weight"] = fake_quantize(module.weight, module.weight_scale, zero,
                                                        scheme.weights).contiguous()
                quantized.append(name)
        for name, tensor in model.state_dict().items():
            leaf = name.rsplit(".", 1)[-1]
            if name not in state and not leaf.startswith(("weight_", "input_", "output_")):
                state[name] = tensor.contiguous()
    missing = sorted(set(layers) - set(quantized) - set(ignored))
    if missing:
        raise SystemExit(f"llm-compressor did not quantize {missing}")
    # tied embeddings share storage; safetensors refuses shared tensors
    state = {name: tensor.clone() for name, tensor in state.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, args.out)
    info = {"seconds": seconds, "quantized": quantized, "ignored": ignored}
    args.out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
