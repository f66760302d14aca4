"""``attn_implementation="brecq_sdpa"``: transformers' SDPA attention, with decode steps on the CPU
run by brecq_ext's decode-attention kernel (:mod:`brecq_ext.attention`).

torch's CPU ``scaled_dot_product_attention`` costs ~95-110 us per layer for one Qwen3-0.6B decode
token over 48 cached bfloat16 ones (2.7-3 ms of a 25 ms W4/W6 decode step over 28 layers) and
~0.9 ms at 512; the kernel takes 14-17 us and ~0.15 ms (bench/README.md). Everything
else (prompts, several query tokens, dropout, additive or per-head masks, other devices, autograd)
goes to transformers' own ``sdpa_attention_forward`` unchanged, and masks are built as for SDPA.

    import brecq.attention
    brecq.attention.use_decode_attention(model)   # registers "brecq_sdpa" and switches the model to it

Nothing is registered on import.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from brecq_ext.attention import decode_attention_forward

log = logging.getLogger("brecq")

ATTENTION = "brecq_sdpa"
_registered = False


def _key_mask(attention_mask: torch.Tensor | None, batch: int, kv_len: int):
    """transformers' SDPA mask for one query token as bool ``[batch, kv_len]`` (a view), None for
    no mask, or False when the mask is not one the kernel takes (additive, or per head)."""
    if attention_mask is None:
        return None
    if (attention_mask.dtype is not torch.bool or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
            or attention_mask.shape[2] != 1 or attention_mask.shape[3] != kv_len
            or attention_mask.shape[0] not in (1, batch)):
        return False
    return attention_mask[:, 0, 0, :].expand(batch, kv_len)


def brecq_sdpa_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                 scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """An attention function of transformers' ``AttentionInterface``: query ``[batch, q_heads,
    q_len, head_dim]``, key and value ``[batch, kv_heads, kv_len, head_dim]`` (the cache after this
    step's update), the mask from the SDPA mask builder; returns ``([batch, q_len, q_heads,
    head_dim], None)``."""
    batch, _, q_len, head_dim = query.shape
    if (q_len == 1 and query.is_cpu and not dropout and kwargs.get("softcap") is None
            and kwargs.get("position_bias") is None and not kwargs.get("output_attentions", False)):
        key_mask = _key_mask(attention_mask, batch, key.shape[2])
        if key_mask is not False:
            scale = float(scaling) if scaling is not None else head_dim ** -0.5
            out = decode_attention_forward(query[:, :, 0], key, value, key_mask, scale)
            return out.unsqueeze(1), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register_attention() -> str:
    """Register ``"brecq_sdpa"`` with transformers (attention function and SDPA's mask builder);
    idempotent. Returns the name to pass as ``attn_implementation``."""
    global _registered
    if not _registered:
        try:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        except ImportError as exc:
            raise RuntimeError(f"{ATTENTION} needs transformers' AttentionInterface and AttentionMaskInterface "
                               f"(transformers 4.53 or later): {exc}") from exc

        AttentionInterface.register(ATTENTION, brecq_sdpa_attention_forward)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
        _registered = True
    return ATTENTION


def use_decode_attention(model: nn.Module) -> nn.Module:
    """Switch a transformers model (and its submodels) to ``"brecq_sdpa"``; returns the model."""
    model.set_attn_implementation(register_attention())
    log.info("attention: %s (decode steps on the CPU through brecq_ext.decode_attention)", ATTENTION)
    return model
