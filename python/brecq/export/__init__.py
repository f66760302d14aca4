"""Exports of brecq-quantized models to the formats models are served from.

* :func:`export_gguf` — one GGUF file for llama.cpp / ollama (``to_gguf``; block map in
  ``gguf_blocks`` and docs/FORMAT.md); :func:`export_gguf_full_precision` writes an unquantized
  model, the input of llama.cpp's own quantizer.
* :func:`export_compressed_tensors` — a Hugging Face folder in compressed-tensors'
  ``pack-quantized`` format for vLLM, transformers and llm-compressor (``to_compressed_tensors``).

Both read what ``brecq quantize`` saved (``source.read_checkpoint``, checksum verified) and never
re-quantize a layer the target format can hold exactly.
"""
from __future__ import annotations

from .gguf_blocks import Fallback
from .source import QuantizedCheckpoint, QuantizedLayer, read_checkpoint

FORMATS = ("gguf", "compressed-tensors")


def export_gguf(quantized_dir, out_path, **kwargs):
    from .to_gguf import export_gguf as _export

    return _export(quantized_dir, out_path, **kwargs)


def export_gguf_full_precision(model_dir, out_path, **kwargs):
    from .to_gguf import export_gguf_full_precision as _export

    return _export(model_dir, out_path, **kwargs)


def export_compressed_tensors(quantized_dir, out_dir, **kwargs):
    from .to_compressed_tensors import export_compressed_tensors as _export

    return _export(quantized_dir, out_dir, **kwargs)


def export(quantized_dir, out, format: str, **kwargs):
    """``format``: ``"gguf"`` or ``"compressed-tensors"``."""
    if format == "gguf":
        return export_gguf(quantized_dir, out, **kwargs)
    if format == "compressed-tensors":
        return export_compressed_tensors(quantized_dir, out, **kwargs)
    raise ValueError(f"export: format must be one of {FORMATS}, got {format!r}")


__all__ = [
    "FORMATS",
    "Fallback",
    "QuantizedCheckpoint",
    "QuantizedLayer",
    "export",
    "export_compressed_tensors",
    "export_gguf",
    "export_gguf_full_precision",
    "read_checkpoint",
]
