"""BRECQ inside llama.cpp's own block types (Q4_K, Q5_K, Q6_K, Q8_0 and their fallbacks).

* ``layouts``: the block layouts as grids (read, write codes, dequantize);
* ``search``: scales and mins, by llama.cpp's own quantizer or brecq's min/max;
* ``rounding``: AdaRound on such a grid;
* ``presets``: llama.cpp's type maps (Q4_K_M, Q5_K_M, Q6_K, Q8_0);
* ``pipeline``: a Hugging Face model to a GGUF file, BRECQ-rounded (:func:`quantize_gguf`), and
  any GGUF file's weights back into a model for evaluation (:func:`load_gguf_weights`).
"""
from __future__ import annotations

from .layouts import BlockType, Grid, dequantize, read_grid, write_codes
from .presets import PRESETS, KQuantPreset, get_preset
from .search import Search, SearchUnavailable, quantize_blocks

__all__ = [
    "PRESETS",
    "BlockType",
    "Grid",
    "KQuantPreset",
    "Search",
    "SearchUnavailable",
    "dequantize",
    "get_preset",
    "load_gguf_weights",
    "quantize_blocks",
    "quantize_gguf",
    "read_grid",
    "write_codes",
]


def __getattr__(name):  # the pipeline imports transformers: only when asked for
    if name in ("quantize_gguf", "load_gguf_weights", "importance_matrix"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
