"""What an exporter reads: a directory written by ``brecq quantize`` (``brecq.io.save_quantized``),
opened without building a model. The checksum recorded at save time is verified first, so no
export is ever written from a truncated or edited checkpoint."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from brecq_ext import ops

from ..io import CorruptCheckpoint, open_saved


@dataclass(frozen=True)
class QuantizedLayer:
    """One packed linear layer as integer codes: ``w[o, k] = scale[o, g] * (codes[o, k] - zero[o, g])``
    with ``g = k // group_size`` (docs/FORMAT.md)."""

    name: str
    bits: int
    group_size: int
    codes: torch.Tensor  # uint8 [out, in]
    scale: torch.Tensor  # float16 [out, groups]
    zero: torch.Tensor  # uint8 [out, groups]
    bias: torch.Tensor | None

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def dequantized(self) -> torch.Tensor:
        """float32 ``[out, in]``: the weights brecq's own kernels compute with."""
        return ops.dequantize(self.codes, self.scale, self.zero, self.group_size)


@dataclass
class QuantizedCheckpoint:
    """A saved quantized model: its Hugging Face config (without ``quantization_config``), the
    quantization record, the quantized layers by module name, every other tensor by its state-dict
    name, and the directory (for the tokenizer files)."""

    path: Path
    config: dict
    quantization: dict
    layers: dict[str, QuantizedLayer] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False)) and "lm_head" not in self.layers

    def dense(self, name: str) -> torch.Tensor:
        """An unquantized tensor by state-dict name; a tied ``lm_head.weight`` resolves to the
        embeddings it shares."""
        if name in self.tensors:
            return self.tensors[name]
        if name == "lm_head.weight" and self.tied_embeddings:
            return self.tensors["model.embed_tokens.weight"]
        raise KeyError(f"{self.path}: no tensor {name!r} in model.safetensors")


def read_checkpoint(path, verify: bool = True) -> QuantizedCheckpoint:
    """Open ``path`` (a ``brecq quantize`` output directory). Refuses a directory that is not one,
    an unsupported format version, and (``verify``) weights whose checksum differs from the one
    recorded."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory (expected the output folder of `brecq quantize`)")
    config, qc, weights = open_saved(path, verify)
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except SafetensorError as exc:
        raise CorruptCheckpoint(f"{weights}: not a readable safetensors file ({exc})") from None
    checkpoint = QuantizedCheckpoint(path, config, qc)
    for name, spec in qc["modules"].items():
        try:
            packed, scale, zero = (stored.pop(f"{name}.{part}") for part in ("packed", "scale", "zero"))
        except KeyError as exc:
            raise CorruptCheckpoint(f"{weights}: quantized layer {name!r} lacks tensor {exc}") from None
        bias = stored.pop(f"{name}.bias", None)
        codes = ops.unpack(packed, spec["bits"], spec["group_size"], spec["in_features"])
        checkpoint.layers[name] = QuantizedLayer(name, spec["bits"], spec["group_size"], codes, scale, zero, bias)
    _untie(checkpoint, stored, weights)
    return checkpoint


def _untie(checkpoint: QuantizedCheckpoint, stored: dict, where: Path) -> None:
    """Tied tensors are stored once, under either name: keep them as the embeddings alone."""
    if checkpoint.tied_embeddings:
        shared = stored.pop("lm_head.weight", None)
        stored.setdefault("model.embed_tokens.weight", shared)
        if stored["model.embed_tokens.weight"] is None:
            raise CorruptCheckpoint(f"{where}: tied embeddings are stored under neither "
                                    "model.embed_tokens.weight nor lm_head.weight")
    checkpoint.tensors = stored


def read_full_precision(path) -> QuantizedCheckpoint:
    """A Hugging Face model folder (config.json and safetensors shards, no quantization) as a
    checkpoint with no quantized layers: what a GGUF of the unquantized model is written from, e.g.
    as the input of llama.cpp's own quantizer."""
    import json

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: config.json is missing (expected a Hugging Face model folder)")
    config = json.loads(config_file.read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{path}: this model is quantized; export it with export_gguf")
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{path}: no .safetensors weights")
    stored: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                stored.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118 (not a dict)
        except SafetensorError as exc:
            raise CorruptCheckpoint(f"{shard}: not a readable safetensors file ({exc})") from None
    checkpoint = QuantizedCheckpoint(path, config, {})
    _untie(checkpoint, stored, path)
    return checkpoint


def rope_settings(config: dict) -> tuple[float, dict | None]:
    """(rope theta, scaling or None) from a config of either transformers generation: 4.x keeps
    ``rope_theta`` and ``rope_scaling``, 5.x one ``rope_parameters`` dict."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    rope_type = params.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if rope_type in (None, "default"):
        return float(theta), None
    return float(theta), dict(params or scaling, rope_type=rope_type)

