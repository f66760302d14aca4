"""brecq_ext: the kernel library of brecq.

* :mod:`brecq_ext.ops` — torch custom ops (``torch.ops.brecq.*``): quantization parameters,
  quantize / dequantize / fake-quantize, AdaRound soft rounding and its regulariser, bit packing,
  packed low-bit matmul.
* :mod:`brecq_ext.reference` — one pure-PyTorch reference per kernel.
* :mod:`brecq_ext.format` — the packed weight format and its exact storage cost.
* :mod:`brecq_ext.layout` — in-memory layouts of packed weights (row-major; TILE16 for the AVX-512
  CPU kernel).
* :class:`QuantLinear` — a drop-in ``nn.Linear`` with packed weights.
* :func:`fuse_projections_` — one packed matmul for projections of one input (q/k/v, gate/up).
* :mod:`brecq_ext.attention` — attention of one query token over a key/value cache
  (``torch.ops.brecq.decode_attention``; faster CPU decode).
* :mod:`brecq_ext.norm` — RMS normalisation (``torch.ops.brecq.rms_norm``) and :class:`RMSNorm`,
  a drop-in for transformers' Llama/Qwen RMSNorm (:func:`fuse_rms_norms_`; faster CPU decode).
* :mod:`brecq_ext.arena` — one region, on huge pages where the OS allows, for a model's packed
  weights (:func:`gather_quantized_weights`; faster CPU decode).
"""
from . import arena, attention, format, layout, norm, ops, reference
from ._extension import cpu_isa, detected_cpu_isa, set_cpu_isa
from .arena import WeightArena, gather_quantized_weights
from .format import FORMAT_VERSION, LayerStorage, layer_storage
from .fusion import FusedProjection, FusedQuantLinear, fuse_projections_
from .layout import Layout
from .norm import RMSNorm, fuse_rms_norms_
from .ops import Clipping
from .quant_linear import (LayerRule, QuantLinear, match_linear_layers, quant_linear_layers,
                           replace_linear_layers)

__version__ = "0.1.0"

__all__ = [
    "ops", "attention", "reference", "format", "layout", "Layout", "QuantLinear", "LayerRule", "Clipping",
    "replace_linear_layers", "match_linear_layers", "quant_linear_layers", "layer_storage", "LayerStorage", "FORMAT_VERSION",
    "cpu_isa", "detected_cpu_isa", "set_cpu_isa", "arena", "WeightArena", "gather_quantized_weights",
    "fuse_projections_", "FusedQuantLinear", "FusedProjection", "norm", "RMSNorm", "fuse_rms_norms_",
]
