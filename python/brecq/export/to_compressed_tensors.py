"""``brecq export --format compressed-tensors``: a Hugging Face model folder in compressed-tensors'
``pack-quantized`` format, which vLLM, transformers (with the ``compressed-tensors`` package) and
llm-compressor load.

Per quantized layer ``X`` (docs/FORMAT.md, "Export"):

* ``X.weight_packed`` int32 ``[out, ceil(in * b / 32)]``: the codes of each row as one LSB-first bit
  stream of ``b``-bit fields read as little-endian 32-bit words, ``b`` = 4 for brecq's 2-4-bit layers
  and 8 for its 5-8-bit layers (the only widths vLLM's kernels take). The format stores signed
  values offset by ``2^(b-1)``; a code ``q`` is written as the signed value ``q - 2^(b-1)``, so the
  stored field is ``q`` itself.
* ``X.weight_zero_point`` int32 ``[ceil(out * b / 32), groups]``: the zero points, likewise offset,
  packed along the output dimension.
* ``X.weight_scale`` ``[out, groups]`` in the export dtype, ``X.weight_shape`` int64 ``[2]``.

Dequantization there is ``(q_signed - z_signed) * scale = (q - z) * s``: brecq's own weights. The
scales are float16 in brecq; an export dtype of float16 or float32 holds them exactly (bfloat16
would round them, and is refused unless asked for, with the error measured).
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from brecq_ext import ops

from ..io import TOKENIZER_FILES, atomic_save_tensors, atomic_write_text
from .source import QuantizedCheckpoint, QuantizedLayer, read_checkpoint

log = logging.getLogger("brecq")

FORMAT = "pack-quantized"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def stored_bits(bits: int) -> int:
    """The width a brecq layer of ``bits`` is written at: 4 or 8, the widths vLLM serves."""
    return 4 if bits <= 4 else 8


@dataclass
class CompressedTensorsReport:
    path: Path
    dtype: str
    layers: list[dict] = field(default_factory=list)
    dense_inexact: dict[str, int] = field(default_factory=dict)  # tensor -> elements changed by the dtype cast

    @property
    def exact(self) -> bool:
        return all(row["max_error_steps"] == 0 for row in self.layers)

    def bits_per_weight(self) -> float:
        weights = sum(row["weights"] for row in self.layers)
        return 8.0 * sum(row["bytes"] for row in self.layers) / max(1, weights)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "dtype": self.dtype, "quantized_bits_per_weight": self.bits_per_weight(),
                "exact": self.exact, "layers": self.layers, "dense_inexact": self.dense_inexact}


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, cols] -> int32 [rows, ceil(cols * bits / 32)], LSB-first within each row."""
    cols = codes.shape[1]
    packed = ops.pack(codes.contiguous(), bits, 8)  # rows padded with code 0 to a multiple of 8
    words = -(-cols * bits // 32)
    return packed.view(torch.int32)[:, :words].contiguous()


def _default_dtype(checkpoint: QuantizedCheckpoint) -> str:
    """float16 when it holds every full-precision tensor exactly (the scales always fit), else
    float32: brecq saves float32, whatever the model came as."""
    for tensor in checkpoint.tensors.values():
        if tensor.is_floating_point() and not torch.equal(tensor.to(torch.float16).float(), tensor.float()):
            return "float32"
    return "float16"


def _weights_args(bits: int, group_size: int) -> dict:
    return {"num_bits": stored_bits(bits), "type": "int", "symmetric": False, "strategy": "group",
            "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax"}


def quantization_config(layers: dict[str, QuantizedLayer], ignore: list[str]) -> dict:
    """compressed-tensors' ``quantization_config``: one config group per (stored bits, group size),
    whose targets are the exact module names of its layers."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, layer in layers.items():
        groups.setdefault((stored_bits(layer.bits), layer.group_size), []).append(name)
    config_groups = {
        f"group_{i}": {"targets": sorted(names), "weights": _weights_args(bits, group_size),
                       "input_activations": None, "output_activations": None, "format": FORMAT}
        for i, ((bits, group_size), names) in enumerate(sorted(groups.items()))}
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": sorted(ignore), "kv_cache_scheme": None,
            "sparsity_config": {}}


def validate_config(qc: dict) -> None:
    """Check ``qc`` against the compressed-tensors package's own schema (when it is installed)."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        log.info("compressed-tensors is not installed: its schema was not checked")
        return
    QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "sparsity_config"})


def export_compressed_tensors(quantized_dir, out_dir, *, dtype: str | None = None, verify: bool = True,
                              allow_inexact_scales: bool = False) -> CompressedTensorsReport:
    """Write ``quantized_dir`` (from ``brecq quantize``) to ``out_dir`` in compressed-tensors'
    pack-quantized format. ``dtype`` (float16, bfloat16, float32) is the model's dtype there and
    the scales'; the default is float16 where it holds every full-precision tensor exactly, else
    float32 (vLLM's W4A16/W8A16 kernels want a 16-bit dtype: pass float16 and read the log)."""
    checkpoint = read_checkpoint(quantized_dir, verify=verify)
    dtype = dtype or _default_dtype(checkpoint)
    if dtype not in DTYPES:
        raise ValueError(f"export: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if dtype == "bfloat16" and not allow_inexact_scales:
        raise ValueError("export: bfloat16 cannot hold brecq's float16 scales exactly (3 fewer mantissa bits); "
                         "use float16 or float32, or allow_inexact_scales=True to accept the measured error")
    torch_dtype = DTYPES[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = CompressedTensorsReport(out, dtype)
    tensors: dict[str, torch.Tensor] = {}
    packable, dense_layers = {}, []
    for name, layer in checkpoint.layers.items():
        if layer.in_features % layer.group_size:
            # The format's group dequantization wants whole groups: such a layer goes dense.
            tensors.update(_dense_layer_tensors(name, layer, torch_dtype, report))
            dense_layers.append(name)
        else:
            packable[name] = layer
            tensors.update(_layer_tensors(name, layer, torch_dtype, report))
    for name, tensor in checkpoint.tensors.items():
        cast = tensor.to(torch_dtype) if tensor.is_floating_point() else tensor
        if tensor.is_floating_point():
            changed = int((cast.to(tensor.dtype) != tensor).sum())
            if changed:
                report.dense_inexact[name] = changed
        tensors[name] = cast
    ignore = _unquantized_linears(checkpoint) + dense_layers
    qc = quantization_config(packable, ignore)
    validate_config(qc)
    config = dict(checkpoint.config)
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
    config["quantization_config"] = qc
    metadata = {"format": "pt", "brecq_source_sha256": str(checkpoint.quantization.get("weights_sha256", ""))}
    atomic_save_tensors(tensors, out / "model.safetensors", metadata=metadata)
    for file in TOKENIZER_FILES:
        if (checkpoint.path / file).exists():
            shutil.copyfile(checkpoint.path / file, out / file)
    atomic_write_text(out / "brecq_export.json", json.dumps(
        {"source": str(checkpoint.path), "source_quantization": checkpoint.quantization, **report.to_dict()},
        indent=2, default=str))
    atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True, default=str))  # last
    for name, count in report.dense_inexact.items():
        log.warning("compressed-tensors export: %d elements of %s changed in the cast to %s", count, name, dtype)
    for row in report.layers:
        if row["note"]:
            log.warning("compressed-tensors export: %s: %s", row["name"], row["note"])
    log.info("wrote %s (%s, quantized layers %.3f bits/weight)", out, dtype, report.bits_per_weight())
    return report


def _layer_tensors(name: str, layer: QuantizedLayer, dtype: torch.dtype, report) -> dict[str, torch.Tensor]:
    bits = stored_bits(layer.bits)
    packed = _pack_rows(layer.codes, bits)
    zero = _pack_rows(layer.zero.t(), bits).t().contiguous()  # packed along the output dimension
    scale = layer.scale.to(dtype)
    # A rounded scale moves a weight by |q - z| * |ds| <= (2^bits - 1) * |ds|: in steps of s, below.
    relative = ((scale.float() - layer.scale.float()).abs() / layer.scale.float()).max()
    steps = float(relative) * (2 ** layer.bits - 1)
    tensors = {f"{name}.weight_packed": packed, f"{name}.weight_zero_point": zero,
               f"{name}.weight_scale": scale, f"{name}.weight_shape": torch.tensor(layer.codes.shape)}
    if layer.bias is not None:
        tensors[f"{name}.bias"] = layer.bias.to(dtype)
    report.layers.append({"name": name, "bits": layer.bits, "stored_bits": bits, "group_size": layer.group_size,
                          "weights": layer.out_features * layer.in_features,
                          "bytes": packed.numel() * 4 + zero.numel() * 4 + scale.numel() * scale.element_size(),
                          "max_error_steps": steps, "note": ""})
    return tensors


def _dense_layer_tensors(name: str, layer: QuantizedLayer, dtype: torch.dtype, report) -> dict[str, torch.Tensor]:
    """A layer the format's groups cannot hold, as its dequantized weight (in ``ignore``)."""
    weight = layer.dequantized()
    cast = weight.to(dtype)
    scale = layer.scale.float().repeat_interleave(layer.group_size, dim=1)[:, :layer.in_features]
    steps = float(((cast.float() - weight).abs() / scale).max())
    tensors = {f"{name}.weight": cast}
    if layer.bias is not None:
        tensors[f"{name}.bias"] = layer.bias.to(dtype)
    report.layers.append({"name": name, "bits": layer.bits, "stored_bits": None, "group_size": layer.group_size,
                          "weights": weight.numel(), "bytes": cast.numel() * cast.element_size(),
                          "max_error_steps": steps,
                          "note": f"in_features {layer.in_features} is not a multiple of the group size "
                                  f"{layer.group_size}: written dense ({str(dtype).replace('torch.', '')}), "
                                  "listed in ignore"})
    return tensors


def _unquantized_linears(checkpoint: QuantizedCheckpoint) -> list[str]:
    """Linear layers that stay in full precision (the head, and any projection no rule matched)."""
    names = [key[: -len(".weight")] for key, t in checkpoint.tensors.items()
             if key.endswith(".weight") and t.dim() == 2 and (key.startswith("lm_head") or key.endswith("_proj.weight"))]
    if "lm_head" not in checkpoint.layers and "lm_head" not in names:
        names.append("lm_head")  # tied to the embeddings: a Linear all the same
    return names



def load_compressed_tensors(path, device: str = "cpu"):
    """A dense transformers model from a pack-quantized folder, each layer decompressed by the
    compressed-tensors package with the scheme of the config group that targets it.

    transformers' own ``from_pretrained(..., dequantize=True)`` decompresses every dense layer with
    one scheme (the first config group), which is right for single-scheme models and wrong for a
    mixed one such as the study's W6 attention / W4 MLP (transformers 5.25, compressed-tensors
    0.20.1; docs/FORMAT.md). This loader reads the same files the way vLLM does, per layer."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_name
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    qc = QuantizationConfig.model_validate(
        {k: v for k, v in config.pop("quantization_config").items() if k != "sparsity_config"})
    dtype = DTYPES[config.get("dtype", "float32")]
    model_type = config.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **{k: v for k, v in config.items()
                                                    if k not in ("transformers_version", "architectures")})
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    stored = load_file(str(path / "model.safetensors"))
    state: dict[str, torch.Tensor] = {}
    modules = {key.rsplit(".", 1)[0] for key in stored if key.endswith(".weight_packed")}
    for module in modules:
        scheme = next((group for group in qc.config_groups.values()
                       if any(match_name(module, target) for target in group.targets)), None)
        if scheme is None:
            raise ValueError(f"{path}: {module} has packed weights but no config group targets it")
        parts = {key[len(module) + 1:]: stored.pop(key) for key in list(stored) if key.startswith(module + ".")
                 and key[len(module) + 1:].startswith("weight_")}
        compressor = BaseCompressor.get_value_from_registry(scheme.format or qc.format)
        state[f"{module}.weight"] = compressor.decompress(parts, scheme)["weight"].to(dtype)
    state.update(stored)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and hf_config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if hf_config.tie_word_embeddings:
        model.tie_weights()
    return model.to(device).eval()
