"""brecq's grouped codes as llama.cpp (GGUF) blocks: which block type holds a layer, and the bytes.

The map (docs/FORMAT.md, "Export"): every GGUF block covers 32 consecutive inputs of one row and
carries its own float16 scale, so a brecq group of ``group_size`` (a multiple of 32) becomes
``group_size / 32`` blocks that repeat the group's scale.

* 2-4 bits -> Q4_1 (``x = d*q + m``): ``d = s``, ``q`` = brecq's code, ``m = fp16(-s*z)``.
  Exact but for the rounding of ``m`` to float16: at most ``z * 2^-11`` quantization steps.
* 5 bits -> Q5_1, the same way (``z * 2^-11 <= 0.015`` steps).
* 6-7 bits -> Q8_0 (``x = d*q8``): ``d = s``, ``q8 = q - z``, which fits int8: exact.
* 8 bits -> Q8_0: blocks whose ``q - z`` fits int8 are exact; any other block is stored with
  ``d = 2s`` and ``q8 = (q - z) / 2`` rounded half to even and clamped to +-127 (at most one
  step off; the export logs how many blocks and the largest error), or, with ``exact_8bit``,
  the whole layer goes to the fallback.
* A layer no block type holds (in_features or group size not a multiple of 32, an ``m`` beyond
  float16's range) goes to the fallback, F32 by default: exact, at 32 bits per weight.

The byte layouts are llama.cpp's ``block_q4_1``, ``block_q5_1`` and ``block_q8_0``: float16 fields
little-endian; Q4_1/Q5_1 put input ``j`` of a block in the low nibble of byte ``j`` and input
``j + 16`` in its high nibble; Q5_1 keeps bit 4 of input ``j`` in bit ``j`` of a little-endian
uint32.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 32  # inputs per GGUF block (QK4_1 = QK5_1 = QK8_0 = 32)
BLOCK_BYTES = {"Q4_1": 2 + 2 + 16, "Q5_1": 2 + 2 + 4 + 16, "Q8_0": 2 + 32}  # 5.0, 6.0, 8.5 bits per weight
M_ROUNDING_STEPS_PER_ZERO = 2.0 ** -11  # |fp16(m) - m| <= |m| * 2^-11, and |m| = s * z


class Fallback(enum.Enum):
    """Where a layer goes when no block type holds its codes."""

    F32 = "f32"  # exact
    F16 = "f16"  # half the bytes; each weight rounded to float16 (relative error <= 2^-11)


@dataclass(frozen=True)
class PackedTensor:
    """A tensor ready for the GGUF writer: ``data`` is uint8 ``[out, bytes_per_row]`` for block
    types and float ``[out, in]`` for F32/F16."""

    ggml_type: str  # a gguf.GGMLQuantizationType name
    data: np.ndarray
    max_error_steps: float  # largest |exported - brecq| over the layer, in units of its scale
    requantized_blocks: int = 0  # blocks not held exactly (8-bit Q8_0 only)
    reason: str = ""  # why a fallback was taken

    @property
    def exact(self) -> bool:
        return self.max_error_steps == 0.0


def block_type_for(bits: int, in_features: int, group_size: int) -> str | None:
    """The GGUF block type that holds a layer of these settings, or None (fallback)."""
    if in_features % BLOCK or group_size % BLOCK:
        return None
    if bits <= 4:
        return "Q4_1"
    if bits == 5:
        return "Q5_1"
    return "Q8_0"


def _per_block(per_group: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """[out, groups] -> [out, in_features / 32]: the group of each block's first input."""
    block_group = torch.arange(in_features // BLOCK) * BLOCK // group_size
    return per_group[:, block_group]


def _f16_bytes(t: torch.Tensor) -> torch.Tensor:
    """float16 [out, blocks] -> uint8 [out, blocks, 2], little-endian."""
    return t.to(torch.float16).contiguous().view(torch.uint8).view(*t.shape, 2)


def _nibbles(low16: torch.Tensor, high16: torch.Tensor) -> torch.Tensor:
    return (low16 & 0x0F) | ((high16 & 0x0F) << 4)


def _error_steps(exported: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> float:
    """max |exported - s*(q - z)| / s over a layer; arguments per block [out, blocks, 32] / [out, blocks, 1]."""
    ours = (codes.float() - z.float()) * s.float()
    err = (exported - ours).abs() / s.float()
    return float(err.max()) if err.numel() else 0.0


def pack_layer(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
               fallback: Fallback = Fallback.F32, exact_8bit: bool = False) -> PackedTensor:
    """Codes uint8 [out, in] with float16 scale and uint8 zero [out, groups] -> GGUF tensor bytes.
    Rows keep their order; the caller permutes rows first where llama.cpp wants them permuted.
    ``exact_8bit``: an 8-bit layer with any block Q8_0 cannot hold exactly goes to ``fallback``
    instead of Q8_0 with those blocks halved."""
    out_features, in_features = codes.shape
    kind = block_type_for(bits, in_features, group_size)
    if kind is None:
        reason = (f"in_features {in_features} is not a multiple of 32" if in_features % BLOCK
                  else f"group size {group_size} is not a multiple of 32")
        return dense_fallback(codes, scale, zero, group_size, fallback, reason)
    blocks = in_features // BLOCK
    c = codes.to(torch.int32).view(out_features, blocks, BLOCK)
    s = _per_block(scale, in_features, group_size).unsqueeze(-1)  # float16 [out, blocks, 1]
    z = _per_block(zero, in_features, group_size).to(torch.int32).unsqueeze(-1)
    if kind in ("Q4_1", "Q5_1"):
        m = (-(s.float() * z.float())).to(torch.float16)  # s*z is exact in float32: one rounding
        if not torch.isfinite(m).all():
            return dense_fallback(codes, scale, zero, group_size, fallback,
                                  "a group's minimum -s*z is beyond float16's range")
        qs = _nibbles(c[..., :16], c[..., 16:]).to(torch.uint8)
        fields = [_f16_bytes(s.squeeze(-1)), _f16_bytes(m.squeeze(-1))]
        if kind == "Q5_1":
            high = ((c >> 4) & 1).to(torch.int64) << torch.arange(BLOCK, dtype=torch.int64)
            qh = high.sum(-1).contiguous()  # bit j = bit 4 of input j; int64, little-endian
            fields.append(qh.view(torch.uint8).view(out_features, blocks, 8)[..., :4])
        fields.append(qs)
        data = torch.cat(fields, dim=-1).reshape(out_features, blocks * BLOCK_BYTES[kind])
        exported = s.float() * c.float() + m.float()
        return PackedTensor(kind, data.numpy(), _error_steps(exported, c, s, z))
    # Q8_0
    centred = c - z  # in [-(2^bits - 1), 2^bits - 1]
    fits = ((centred >= -128) & (centred <= 127)).all(dim=-1, keepdim=True)
    if exact_8bit and not bool(fits.all()):
        return dense_fallback(codes, scale, zero, group_size, fallback,
                              f"{int((~fits).sum())} blocks with q - z outside int8 (exact_8bit)")
    doubled = (s.float() * 2).to(torch.float16)
    if not bool(fits.all()) and not torch.isfinite(doubled).all():
        return dense_fallback(codes, scale, zero, group_size, fallback, "a doubled scale is beyond float16's range")
    halved = torch.round(centred.float() / 2).clamp(-127, 127).to(torch.int32)
    q8 = torch.where(fits, centred, halved)
    d = torch.where(fits, s, doubled)
    data = torch.cat([_f16_bytes(d.squeeze(-1)), q8.to(torch.int8).view(torch.uint8)], dim=-1)
    exported = d.float() * q8.float()
    return PackedTensor("Q8_0", data.reshape(out_features, blocks * BLOCK_BYTES["Q8_0"]).numpy(),
                        _error_steps(exported, c, s, z), requantized_blocks=int((~fits).sum()))


def dense_fallback(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                   fallback: Fallback, reason: str) -> PackedTensor:
    """The layer's dequantized weights as F32 (exact) or F16."""
    from brecq_ext import ops

    weight = ops.dequantize(codes, scale, zero, group_size)
    if fallback is Fallback.F32:
        return PackedTensor("F32", weight.numpy(), 0.0, reason=reason)
    rounded = weight.to(torch.float16)
    steps = (rounded.float() - weight).abs() / _expand_scale(scale, group_size, weight.shape[1])
    return PackedTensor("F16", rounded.numpy(), float(steps.max()), reason=reason)


def _expand_scale(scale: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    return scale.float().repeat_interleave(group_size, dim=1)[:, :in_features]


def bits_per_weight(ggml_type: str) -> float:
    if ggml_type in BLOCK_BYTES:
        return 8.0 * BLOCK_BYTES[ggml_type] / BLOCK
    return {"F32": 32.0, "F16": 16.0, "BF16": 16.0}[ggml_type]
