"""Choosing a block type's scales, mins and zeros for a layer, before the rounding is learned.

Two searches give the blocks of a float32 weight ``[rows, in_features]``:

* ``Search.LLAMA_CPP``: llama.cpp's own (``ggml_quantize_chunk`` from the ``libggml-base`` that
  ``llama-cpp-python`` ships), with or without an importance matrix: the blocks are exactly what
  ``llama-quantize`` writes for that tensor, so a BRECQ file differs from llama.cpp's only in its
  codes.
* ``Search.MIN_MAX``: brecq's, needing nothing installed: per group the range of the weights
  (K-types, Q5_1) or its largest magnitude (symmetric types), the 6- or 8-bit sub-block scales
  rounded on the super-block's float16 scale, then codes rounded to nearest.
"""
from __future__ import annotations

import ctypes
import enum
import os
from pathlib import Path

import numpy as np

from .layouts import QK_K, BlockType


class Search(enum.Enum):
    LLAMA_CPP = "llama.cpp"
    MIN_MAX = "min_max"


class SearchUnavailable(ImportError):
    """llama.cpp's quantizer library cannot be loaded."""


def quantize_blocks(block_type: BlockType, weight: np.ndarray, search: Search = Search.LLAMA_CPP,
                    importance: np.ndarray | None = None) -> np.ndarray:
    """The blocks of ``weight`` float32 ``[rows, in_features]`` as uint8 ``[rows, bytes per row]``.
    ``importance``: float32 ``[in_features]`` (llama.cpp's importance matrix for this tensor, the
    mean squared input of each column), used by ``Search.LLAMA_CPP`` only."""
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise ValueError(f"quantize_blocks: weight must be 2-D [rows, in_features], got shape {weight.shape}")
    rows, k = weight.shape
    if k % block_type.block:
        raise ValueError(f"quantize_blocks: {block_type.value} needs in_features divisible by {block_type.block}, "
                         f"got {k}")
    if not np.isfinite(weight).all():
        raise ValueError("quantize_blocks: weight has non-finite values")
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (k,):
            raise ValueError(f"quantize_blocks: importance must be float32 [{k}], got shape {importance.shape}")
    if search is Search.LLAMA_CPP:
        return _llama_cpp(block_type, weight, importance)
    return _MIN_MAX[block_type](weight.reshape(rows, k // block_type.block, block_type.block)).reshape(rows, -1)


# -- llama.cpp ------------------------------------------------------------------------------------

_GGML = None


def _libggml():
    global _GGML
    if _GGML is None:
        try:
            import llama_cpp
        except ImportError:
            raise SearchUnavailable("Search.LLAMA_CPP needs llama-cpp-python (pip install 'brecq[llamacpp]'); "
                                    "Search.MIN_MAX needs nothing") from None
        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        candidates = sorted(lib_dir.glob("libggml-base.*")) + sorted(lib_dir.glob("ggml-base.*"))
        errors = []
        for path in candidates:
            try:
                lib = ctypes.CDLL(str(path), mode=getattr(os, "RTLD_GLOBAL", 0))
                fn = lib.ggml_quantize_chunk
                break
            except (OSError, AttributeError) as exc:
                errors.append(f"{path.name}: {exc}")
        else:
            raise SearchUnavailable(f"no ggml_quantize_chunk in {lib_dir} ({'; '.join(errors) or 'no libggml-base'})")
        fn.restype = ctypes.c_size_t
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_void_p]
        _GGML = fn
    return _GGML


def _llama_cpp(block_type: BlockType, weight: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    quantize_chunk = _libggml()
    rows, k = weight.shape
    row_bytes = k // block_type.block * block_type.block_bytes
    out = np.zeros((rows, row_bytes), np.uint8)
    written = quantize_chunk(block_type.ggml_id, weight.ctypes.data, out.ctypes.data, 0, rows, k,
                             None if importance is None else importance.ctypes.data)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {block_type.value} {weight.shape}, "
                           f"expected {out.nbytes}")
    return out


# -- brecq's min/max search -----------------------------------------------------------------------

def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype("<f2")[..., None].view(np.uint8)


def _round(x: np.ndarray) -> np.ndarray:
    return np.rint(x)  # half to even, as llama.cpp's nearest_int


def _inverse(d: np.ndarray) -> np.ndarray:
    return np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)


def _symmetric(w: np.ndarray, centre: int, qmax: int):
    """Step and codes for ``value = d * (q - centre)``: the group's largest-magnitude weight maps to
    ``-centre``, as llama.cpp's Q4_0/Q5_0 do (d may be negative)."""
    idx = np.abs(w).argmax(axis=-1)[..., None]
    extreme = np.take_along_axis(w, idx, axis=-1)
    d = (extreme / -centre).astype(np.float16)
    q = np.clip(_round(w * _inverse(d.astype(np.float32))) + centre, 0, qmax).astype(np.uint8)
    return d, q


def _q4_0(w):
    d, q = _symmetric(w, 8, 15)
    return np.concatenate([_f16_bytes(d[..., 0]), q[..., :16] | (q[..., 16:] << 4)], axis=-1)


def _q5_0(w):
    d, q = _symmetric(w, 16, 31)
    qh = np.packbits(q >> 4, axis=-1, bitorder="little")
    return np.concatenate([_f16_bytes(d[..., 0]), qh, (q[..., :16] & 0xF) | ((q[..., 16:] & 0xF) << 4)], axis=-1)


def _offset(w, qmax: int):
    """Step and codes for ``value = d * q + m`` (Q4_1, Q5_1): the group's min at code 0, its max at qmax."""
    lo, hi = w.min(axis=-1, keepdims=True), w.max(axis=-1, keepdims=True)
    d = ((hi - lo) / qmax).astype(np.float16)
    m = lo.astype(np.float16)
    q = np.clip(_round((w - m.astype(np.float32)) * _inverse(d.astype(np.float32))), 0, qmax).astype(np.uint8)
    return d, m, q


def _q4_1(w):
    d, m, q = _offset(w, 15)
    return np.concatenate([_f16_bytes(d[..., 0]), _f16_bytes(m[..., 0]), q[..., :16] | (q[..., 16:] << 4)], axis=-1)


def _q5_1(w):
    d, m, q = _offset(w, 31)
    qh = np.packbits(q >> 4, axis=-1, bitorder="little")
    return np.concatenate([_f16_bytes(d[..., 0]), _f16_bytes(m[..., 0]), qh,
                           (q[..., :16] & 0xF) | ((q[..., 16:] & 0xF) << 4)], axis=-1)


def _q8_0(w):
    d = (np.abs(w).max(axis=-1, keepdims=True) / 127).astype(np.float16)
    q = np.clip(_round(w * _inverse(d.astype(np.float32))), -127, 127).astype(np.int8)
    return np.concatenate([_f16_bytes(d[..., 0]), q.view(np.uint8)], axis=-1)


def _k_mins(w, qmax: int):
    """Q4_K/Q5_K: per sub-block of 32 a step and a min (``value = d*sc*q - dmin*mn``), both 6-bit
    on the super-block's float16 ``d``, ``dmin``; codes to nearest on the rounded grid."""
    sub = w.reshape(w.shape[:-1] + (8, 32))
    lo = np.minimum(sub.min(axis=-1), 0.0)  # the grid starts at -min <= 0, as llama.cpp's
    step = (sub.max(axis=-1) - lo) / qmax
    d = (step.max(axis=-1) / 63).astype(np.float16)
    dmin = ((-lo).max(axis=-1) / 63).astype(np.float16)
    sc = np.clip(_round(step * _inverse(d.astype(np.float32))[..., None]), 0, 63).astype(np.uint8)
    mn = np.clip(_round(-lo * _inverse(dmin.astype(np.float32))[..., None]), 0, 63).astype(np.uint8)
    s = (d.astype(np.float32)[..., None] * sc).astype(np.float32)
    m = (dmin.astype(np.float32)[..., None] * mn).astype(np.float32)
    q = np.clip(_round((sub + m[..., None]) * _inverse(s)[..., None]), 0, qmax).astype(np.uint8)
    return d, dmin, sc, mn, q.reshape(w.shape)


def _q4_k(w):
    from .layouts import _k_low_nibbles_bytes, _k_scales_bytes
    d, dmin, sc, mn, q = _k_mins(w, 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _k_scales_bytes(sc, mn), _k_low_nibbles_bytes(q)], -1)


def _q5_k(w):
    from .layouts import _k_low_nibbles_bytes, _k_scales_bytes, _q5k_high_bytes
    d, dmin, sc, mn, q = _k_mins(w, 31)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _k_scales_bytes(sc, mn), _q5k_high_bytes(q),
                           _k_low_nibbles_bytes(q)], -1)


def _q6_k(w):
    """Per sub-block of 16 a signed step (its largest-magnitude weight at code 0, i.e. q - 32 = -32),
    8-bit on the super-block's float16 ``d``; codes to nearest on the rounded grid."""
    from .layouts import _q6k_bytes
    sub = w.reshape(w.shape[:-1] + (16, 16))
    idx = np.abs(sub).argmax(axis=-1)[..., None]
    step = np.take_along_axis(sub, idx, axis=-1)[..., 0] / -32
    big = np.abs(step).argmax(axis=-1)[..., None]
    d = (np.take_along_axis(step, big, axis=-1)[..., 0] / -128).astype(np.float16)
    sc = np.clip(_round(step * _inverse(d.astype(np.float32))[..., None]), -128, 127).astype(np.int8)
    s = (d.astype(np.float32)[..., None] * sc).astype(np.float32)
    q = np.clip(_round(sub * _inverse(s)[..., None]) + 32, 0, 63).astype(np.uint8).reshape(w.shape)
    ql, qh = _q6k_bytes(q)
    return np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], -1)


_MIN_MAX = {BlockType.Q4_0: _q4_0, BlockType.Q4_1: _q4_1, BlockType.Q5_0: _q5_0, BlockType.Q5_1: _q5_1, BlockType.Q8_0: _q8_0,
            BlockType.Q4_K: _q4_k, BlockType.Q5_K: _q5_k, BlockType.Q6_K: _q6_k}
assert set(_MIN_MAX) == set(BlockType) and QK_K == 256
