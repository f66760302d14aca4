"""Decode attention: one query token per sequence over its key/value cache (``torch.ops.brecq.decode_attention``).

A decode step of a quantized model on the CPU spends more time in torch's
``scaled_dot_product_attention`` than its few hundred thousand multiply-adds need: 95-110 us per
layer with 48 cached bfloat16 tokens for Qwen3-0.6B's 16 query and 8 key/value heads, 0.9 ms with
512 and 3.7 ms with 2048 (torch 2.13, 2 threads; ``bench/test_bench_attention.py``). The CPU kernel reads each cached key
and value once for all query heads that share it. Other devices run the PyTorch reference.

Layouts: ``query`` ``[batch, q_heads, head_dim]``; ``key``, ``value`` ``[batch, kv_heads, kv_len,
head_dim]`` (a cache; any strides, but unit stride along head_dim is what the kernel reads without
a copy); ``key_mask`` bool ``[batch, kv_len]`` or None. ``q_heads`` is a multiple of ``kv_heads``
and query head h reads key/value head ``h // (q_heads // kv_heads)``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._extension import cpu_kernels

OP = "brecq.decode_attention"
# Query heads per key/value head that the CPU kernel handles (its per-thread state); more run the reference.
MAX_CPU_GROUP = 64
_CPU_DTYPES = (torch.float32, torch.bfloat16)


def _check(query, key, value, key_mask, scale) -> None:
    check_tensor(OP, "query", query, FLOAT_DTYPES, 3)
    check_tensor(OP, "key", key, (query.dtype,), 4)
    check_tensor(OP, "value", value, (query.dtype,), 4)
    batch, q_heads, dim = query.shape
    if key.shape[0] != batch or key.shape[3] != dim:
        raise ValueError(f"{OP}: key must be [batch={batch}, kv_heads, kv_len, head_dim={dim}] "
                         f"(query is [batch, q_heads, head_dim] = {tuple(query.shape)}), got {tuple(key.shape)}")
    if value.shape != key.shape:
        raise ValueError(f"{OP}: value must have key's shape {tuple(key.shape)}, got {tuple(value.shape)}")
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"{OP}: query's heads ({q_heads}) must be a multiple of key's heads ({kv_heads})")
    if kv_len == 0:
        raise ValueError(f"{OP}: key must hold at least one cached position (kv_len is 0)")
    if key_mask is not None:
        check_tensor(OP, "key_mask", key_mask, (torch.bool,), 2)
        if tuple(key_mask.shape) != (batch, kv_len):
            raise ValueError(f"{OP}: key_mask must be [batch, kv_len] = {(batch, kv_len)}, got {tuple(key_mask.shape)}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{OP}: scale must be a finite number, got {scale!r}")
    check_same_device(OP, query=query, key=key, value=value, key_mask=key_mask)


@torch.library.custom_op("brecq::decode_attention", mutates_args=())
def decode_attention(query: Tensor, key: Tensor, value: Tensor, key_mask: Tensor | None, scale: float) -> Tensor:
    """softmax(scale · q · Kᵀ) · V for one query token per sequence: ``[batch, q_heads, head_dim]``
    in query's dtype (layouts in the module docstring). Keys hidden by ``key_mask`` take no weight;
    a sequence with no visible key gets zeros."""
    _check(query, key, value, key_mask, scale)
    return reference.decode_attention(query, key, value, key_mask, scale)


def _decode_attention_cpu(query: Tensor, key: Tensor, value: Tensor, key_mask: Tensor | None, scale: float) -> Tensor:
    """The CPU implementation, on checked arguments."""
    kernels = cpu_kernels()
    batch, q_heads, dim = query.shape
    _, kv_heads, kv_len, _ = key.shape
    if kernels is None or query.dtype not in _CPU_DTYPES or q_heads // kv_heads > MAX_CPU_GROUP:
        return reference.decode_attention(query, key, value, key_mask, scale)
    q = query.contiguous()
    k_strides, v_strides = key.stride(), value.stride()
    if k_strides[3] != 1:
        key = key.contiguous()
        k_strides = key.stride()
    if v_strides[3] != 1:
        value = value.contiguous()
        v_strides = value.stride()
    mask_address = mask_stride = 0
    if key_mask is not None:
        if key_mask.stride(1) != 1:
            key_mask = key_mask.contiguous()
        mask_address, mask_stride = key_mask.data_ptr(), key_mask.stride(0)
    out = torch.empty_like(q)  # [batch, q_heads, head_dim] contiguous, like q; 0.2 us less than torch.empty
    kernels.decode_attention(q.data_ptr(), key.data_ptr(), value.data_ptr(), mask_address, query.dtype is torch.bfloat16,
                             batch, q_heads, kv_heads, kv_len, dim, k_strides[0], k_strides[1], k_strides[2],
                             v_strides[0], v_strides[1], v_strides[2], mask_stride, scale, out.data_ptr(),
                             torch.get_num_threads())
    return out


@decode_attention.register_kernel("cpu")
def _(query, key, value, key_mask, scale):
    _check(query, key, value, key_mask, scale)
    return _decode_attention_cpu(query, key, value, key_mask, scale)


@decode_attention.register_fake
def _(query, key, value, key_mask, scale):
    _check(query, key, value, key_mask, scale)
    return query.new_empty(query.shape)


def decode_attention_forward(query: Tensor, key: Tensor, value: Tensor, key_mask: Tensor | None,
                             scale: float) -> Tensor:
    """``decode_attention`` for model forwards: in eager inference on the CPU, float32 or bfloat16
    arguments whose shapes agree go straight to the kernel (the custom-op dispatcher and the full
    argument check cost ~5 us more, a third of the whole call at 48 cached tokens); anything else,
    including every malformed call, goes through the op and its checks."""
    if query.is_cpu and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
        dtype, q_shape, k_shape = query.dtype, query.shape, key.shape
        if (dtype in _CPU_DTYPES and key.dtype is dtype and value.dtype is dtype and len(q_shape) == 3
                and len(k_shape) == 4 and value.shape == k_shape and k_shape[0] == q_shape[0]
                and k_shape[3] == q_shape[2] and k_shape[1] and k_shape[2] and not q_shape[1] % k_shape[1]
                and value.is_cpu and key.is_cpu and type(scale) is float and math.isfinite(scale)
                and (key_mask is None or (key_mask.dtype is torch.bool and key_mask.is_cpu
                                          and key_mask.shape == (k_shape[0], k_shape[2])))):
            return _decode_attention_cpu(query, key, value, key_mask, scale)
    return decode_attention(query, key, value, key_mask, scale)
