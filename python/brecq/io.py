"""Saving and loading quantized models: config.json with a ``quantization_config`` section, packed
weights in model.safetensors (no pickle), tokenizer files and a readable summary. Every file is
written atomically; config.json is written last and records the checksum of the weights."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from brecq_ext import (
    FORMAT_VERSION,
    FusedQuantLinear,
    QuantLinear,
    fuse_projections_,
    quant_linear_layers,
)
from brecq_ext.arena import gather_quantized_weights

from . import __version__
from .quantization.blocks import set_submodule
from .streaming.safetensors_io import (
    MalformedSafetensors,
    SafetensorsFile,
    TensorEntry,
    tensor_entry,
    write_safetensors,
)

log = logging.getLogger("brecq")

QUANT_METHOD = "brecq"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt", "chat_template.jinja")


class CorruptCheckpoint(ValueError):
    pass


def read_parquet(path: Path):
    """The whole table of a parquet file, read on this thread without pre-buffering: datasets and
    calibration files are small, and Arrow's I/O pool would otherwise stay resident for the rest
    of the process (about 15 MB, which a streamed quantization run feels)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return pq.ParquetFile(path, pre_buffer=False).read(use_threads=False)
    except Exception as exc:  # pyarrow raises several types for malformed files
        raise ValueError(f"{path}: not a readable parquet file ({exc})") from None


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _atomic_target(path: Path):
    """A temporary file beside ``path`` with the permissions a plain ``open`` would give it (mkstemp
    makes 0600 files; outputs honour the user's umask, like the plots and tokenizer files)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    return Path(tmp)


def _commit(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
        os.fchmod(f.fileno(), 0o666 & ~_umask())  # writers that replace the file (safetensors) reset it
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _atomic_target(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def quantized_modules(model: nn.Module) -> dict[str, dict]:
    return {name: {"bits": m.bits, "group_size": m.group_size, "in_features": m.in_features,
                   "out_features": m.out_features, "bias": m.bias is not None}
            for name, m in quant_linear_layers(model)}


def duplicate_names(model: nn.Module) -> set[str]:
    """Names of parameters and buffers that are a second name of one met earlier in module order
    (tied embeddings and lm_head): checkpoints store each tensor once, under its first name."""
    seen: set[int] = set()
    duplicates = set()
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        if id(tensor) in seen:
            duplicates.add(name)
        seen.add(id(tensor))
    return duplicates


def model_tensor_entries(model: nn.Module) -> list[TensorEntry]:
    """The tensors ``save_quantized`` writes for a model in memory: its state dict (packed weights
    row-major), each tied tensor once."""
    skip = duplicate_names(model)
    return [tensor_entry(name, tensor) for name, tensor in model.state_dict().items() if name not in skip]


def save_quantized(model: nn.Module, out_dir, *, recipe: dict, calibration: dict | None, summary: str = "",
                   extra: dict | None = None, tokenizer=None, tokenizer_source=None,
                   tensors: list[TensorEntry] | None = None) -> Path:
    """Write a quantized model (QuantLinear layers) to ``out_dir``; returns the directory.

    ``tensors`` (default: the model's own, :func:`model_tensor_entries`) lets a model that is a
    skeleton on the meta device be written from tensors streamed from elsewhere (streamed
    quantization); the file is the same either way, one tensor at a time in memory."""
    fused = [name for name, module in model.named_modules() if isinstance(module, FusedQuantLinear)]
    if fused:
        # Its state dict names the fused layers, which no loader maps back onto the model's own.
        raise ValueError(f"save_quantized: model has fused projections ({fused[0]}, ... from "
                         f"brecq_ext.fuse_projections_); save the model before fusing it")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    tmp = _atomic_target(weights)
    try:
        with open(tmp, "wb") as f:
            write_safetensors(f, tensors if tensors is not None else model_tensor_entries(model),
                              metadata={"format": "pt", "quant_method": QUANT_METHOD})
        _commit(tmp, weights)
    finally:
        tmp.unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    elif tokenizer_source is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_source) / name
            if src.exists():
                shutil.copyfile(src, out / name)
    if summary:
        atomic_write_text(out / "summary.md", summary)
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "recipe": recipe,
        "modules": quantized_modules(model),
        "calibration": calibration,
        "weights_sha256": sha256_file(weights),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True, default=str))
    log.info("saved quantized model to %s", out)
    return out


def verify_weights(weights: Path, recorded: str | None, hint: str = "") -> None:
    """Refuse a weights file whose sha256 differs from the one recorded at save time (truncated or
    edited): the one check behind load_quantized, from_pretrained and the exporters."""
    if sha256_file(weights) != recorded:
        raise CorruptCheckpoint(f"{weights}: contents do not match the checksum recorded at save time "
                                f"(the file is truncated or was edited); refusing it{hint}")


def open_saved(path, verify: bool = True) -> tuple[dict, dict, Path]:
    """The Hugging Face config (without ``quantization_config``), the quantization record and the
    weights file of a :func:`save_quantized` folder, the checksum verified (``verify``)."""
    path = Path(path)
    config = read_quantization_config(path)
    qc = config.pop("quantization_config")
    weights = path / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{path}: model.safetensors is missing")
    if verify:
        verify_weights(weights, qc.get("weights_sha256"))
    return config, qc, weights


def read_quantization_config(path) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (not a saved model, or an unfinished save)")
    config = json.loads(config_file.read_text())
    qc = config.get("quantization_config")
    if not qc or qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{path}: config.json has no brecq quantization_config")
    if qc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: packed format version {qc.get('format_version')} is not supported "
                         f"(this brecq reads version {FORMAT_VERSION})")
    return config


def load_quantized(path, device="cpu", verify: bool = True, gather_weights: bool = True,
                   fuse_projections: bool = False) -> nn.Module:
    """A working model with QuantLinear layers from a directory written by :func:`save_quantized`.
    Refuses a weights file whose checksum differs from the one recorded (truncated or edited).
    On the CPU, ``gather_weights`` places the packed weights in one huge-page region
    (``brecq_ext.gather_quantized_weights``), where decode reads them fastest.
    ``fuse_projections`` fuses q/k/v and gate/up for inference (``brecq_ext.fuse_projections_``:
    fewer, larger calls per decode step; such a model cannot be saved again)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict, qc, weights = open_saved(path, verify)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **{k: v for k, v in config_dict.items()
                                                 if k not in ("transformers_version", "architectures")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        for name, spec in qc["modules"].items():
            set_submodule(model, name, QuantLinear(spec["in_features"], spec["out_features"], spec["bits"],
                                                   spec["group_size"], bias=spec["bias"]))
    # Memory for what the file holds, and no more: the layers are packed before anything is allocated.
    model = model.to_empty(device="cpu")
    _reset_rotary(model)
    if not isinstance(model.get_output_embeddings(), QuantLinear):  # a packed head is its own tensor
        model.tie_weights()  # tied tensors are stored once, under one of their names
    read_weights(model, weights)
    model.eval()
    model = model.to(device)
    if fuse_projections:
        fuse_projections_(model, regather=False)  # gathered once, below
    if gather_weights:
        gather_quantized_weights(model)  # CPU layers only
    return model


def read_weights(model: nn.Module, weights: Path) -> None:
    """Fill ``model``'s parameters and persistent buffers from the safetensors file ``weights``, a
    tensor (or a 64 MiB slab of one) at a time. Every tensor of the model must be in the file, under
    its own name or a tied one's, and nothing else may be."""
    try:
        file = SafetensorsFile(weights)
    except MalformedSafetensors as exc:
        raise CorruptCheckpoint(str(exc)) from None
    aliases: dict[int, list[str]] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        aliases.setdefault(id(tensor), []).append(name)
    stored, used, missing, done = set(file.tensors), set(), [], set()
    with torch.no_grad():
        for module_name, module in model.named_modules():
            prefix = f"{module_name}." if module_name else ""
            if isinstance(module, QuantLinear):  # row-major in the file, whatever the layer's layout
                keys = list(module.state_dict())
                absent = [prefix + k for k in keys if prefix + k not in stored]
                missing += absent
                if not absent:
                    try:
                        module.load_state_dict({k: file.read(prefix + k) for k in keys})
                    except RuntimeError as exc:
                        raise CorruptCheckpoint(f"{weights}: {module_name} does not match the recorded layout "
                                                f"({exc})") from None
                    used.update(prefix + k for k in keys)
                continue
            own = [(k, t) for k, t in module._parameters.items() if t is not None]
            own += [(k, t) for k, t in module._buffers.items()
                    if t is not None and k not in module._non_persistent_buffers_set]
            for key, tensor in own:
                if id(tensor) in done:
                    continue
                names = [prefix + key] + [n for n in aliases[id(tensor)] if n != prefix + key]
                name = next((n for n in names if n in stored), None)
                if name is None:
                    missing.append(prefix + key)
                    continue
                info = file.tensors[name]
                if tuple(info.shape) != tuple(tensor.shape):
                    raise CorruptCheckpoint(f"{weights}: {name} has shape {list(info.shape)}, the model needs "
                                            f"{list(tensor.shape)}")
                file.read_into(name, tensor)
                used.add(name)
                done.add(id(tensor))
    unexpected = sorted(stored - used)
    if missing or unexpected:
        raise CorruptCheckpoint(f"{weights}: tensors do not match the recorded layout "
                                f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def _reset_rotary(model: nn.Module) -> None:
    """Rotary embeddings hold non-persistent buffers that a meta-device build leaves empty: build
    those modules again from the config."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "config"):
            set_submodule(model, name, type(module)(config=module.config))


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(text: str, base: Path = Path(".")) -> bool:
    """Whether a model entry that is not a local folder reads as a hub id ("org/name") rather than
    a path: not absolute, not starting with '.' or '~', and its first folder not one under ``base``."""
    parts = Path(text).parts
    path_like = text.startswith((".", "/", "~")) or (bool(parts) and (Path(base) / parts[0]).is_dir())
    return not path_like and bool(HUB_ID.fullmatch(text))


def check_model_path(path) -> str:
    """``path`` itself when it exists or is a hub id; otherwise a FileNotFoundError at once, before
    transformers would try the hub with it."""
    text = str(path)
    if Path(text).expanduser().exists() or is_hub_id(text):
        return text
    raise FileNotFoundError(f"{text}: no such model folder")


def load_model_any(path, device="cpu", dtype=None):
    """A model and its tokenizer from ``path``: brecq's loader for models it saved (checksum
    verified), transformers' for everything else."""
    import json as _json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_path(path)
    config_file = Path(path) / "config.json"
    is_brecq = config_file.exists() and (_json.loads(config_file.read_text()).get("quantization_config") or {}).get(
        "quant_method") == QUANT_METHOD
    if is_brecq:
        model = load_quantized(path, device=device)
        if dtype is not None:
            for name, param in model.named_parameters():
                param.data = param.data.to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model, tokenizer
