"""Pure-PyTorch reference of every kernel. The compiled kernels are tested against these.

Formulas are written operation for operation as in csrc/cpu/*.cpp (float32 throughout), so that
quantization parameters, codes, dequantized values and packed bytes match bit for bit; matmuls
and transcendental functions match to rounding.

Tensor conventions: ``weight`` float ``[N, K]`` (N = out_features, K = in_features);
``scale`` float16 and ``zero`` uint8, both ``[N, ceil(K / group_size)]``; ``codes`` uint8 ``[N, K]``;
``packed`` uint8 ``[N, packed_row_bytes(K, group_size, bits)]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .format import max_code, num_groups, packed_row_bytes, padded_in_features

ZETA = 1.1
GAMMA = -0.1
MIN_SCALE = 2.0**-24  # smallest float16 subnormal
MAX_SCALE = 65504.0  # largest finite float16


def _grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, group_size], zero padded."""
    n, k = t.shape
    pad = padded_in_features(k, group_size) - k
    return F.pad(t, (0, pad)).view(n, -1, group_size)


def _expand(per_group: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """[N, G] -> [N, K]."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :k]


def _scale_round_up(s: torch.Tensor) -> torch.Tensor:
    """float32 -> the float16 nearest to s that is not below it."""
    s = s.clamp(MIN_SCALE, MAX_SCALE)
    s16 = s.half()
    below = s16.float() < s
    return torch.where(below, (s16.view(torch.int16) + 1).view(torch.float16), s16)


def _params_for_range(lo: torch.Tensor, hi: torch.Tensor, bits: int):
    qmax = float(max_code(bits))
    scale16 = _scale_round_up((hi - lo) / qmax)
    zero = torch.round(-lo / scale16.float()).clamp(0, qmax)
    return scale16, zero


def quant_params(weight: torch.Tensor, bits: int, group_size: int, search_steps: int = 0):
    """Per-group scale (float16) and zero point (uint8) of ``weight`` [N, K].

    ``search_steps == 0``: min-max over the group, extended to include 0.
    ``search_steps > 0``: shrink the range by 1, 0.99, ... and keep the least squared error.
    """
    w = weight.float()
    wg = _grouped(w, group_size)
    lo = wg.amin(-1).clamp(max=0.0)
    hi = wg.amax(-1).clamp(min=0.0)
    scale, zero = _params_for_range(lo, hi, bits)
    if search_steps > 0:
        qmax = float(max_code(bits))
        best_err = torch.full_like(lo, float("inf"))
        one, step = torch.tensor(1.0), torch.tensor(0.01)
        for i in range(search_steps):
            factor = one - step * float(i)
            s16, z = _params_for_range(lo * factor, hi * factor, bits)
            s = s16.float().unsqueeze(-1)
            q = (torch.round(wg / s) + z.unsqueeze(-1)).clamp(0, qmax)
            err = (wg - (q - z.unsqueeze(-1)) * s).square().sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale = torch.where(better, s16, scale)
            zero = torch.where(better, z, zero)
    return scale, zero.to(torch.uint8)


def quantize(weight, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    k = weight.shape[1]
    s = _expand(scale.float(), group_size, k)
    z = _expand(zero.float(), group_size, k)
    q = (torch.round(weight.float() / s) + z).clamp(0, max_code(bits))
    return q.to(torch.uint8)


def dequantize(codes, scale, zero, group_size: int) -> torch.Tensor:
    k = codes.shape[1]
    s = _expand(scale.float(), group_size, k)
    z = _expand(zero.float(), group_size, k)
    return (codes.float() - z) * s


def fake_quantize(weight, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    """Quantize-dequantize; output in ``weight``'s dtype."""
    q = quantize(weight, scale, zero, bits, group_size)
    return dequantize(q, scale, zero, group_size).to(weight.dtype)


def fake_quantize_mask(weight, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    """Where the straight-through gradient of fake_quantize passes (not clipped)."""
    k = weight.shape[1]
    s = _expand(scale.float(), group_size, k)
    z = _expand(zero.float(), group_size, k)
    q = torch.round(weight.float() / s) + z
    return (q >= 0) & (q <= max_code(bits))


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def adaround_forward(weight, v, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    """w_soft = scale * (clamp(floor(w / scale) + h(V) + zero, 0, qmax) - zero), float32."""
    k = weight.shape[1]
    s = _expand(scale.float(), group_size, k)
    z = _expand(zero.float(), group_size, k)
    q = torch.floor(weight.float() / s) + rectified_sigmoid(v) + z
    return (torch.clamp(q, 0.0, float(max_code(bits))) - z) * s


def _rectified_sigmoid_grad(v: torch.Tensor) -> torch.Tensor:
    """d h / d V, zero where the rectifying clamp is active (bounds pass, as torch.clamp does)."""
    sig = torch.sigmoid(v)
    pre = sig * (ZETA - GAMMA) + GAMMA
    return torch.where((pre >= 0) & (pre <= 1), (ZETA - GAMMA) * sig * (1 - sig), torch.zeros_like(v))


def adaround_backward(grad, weight, v, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    """Gradient of :func:`adaround_forward` with respect to V (analytic, no autograd)."""
    k = weight.shape[1]
    s = _expand(scale.float(), group_size, k)
    z = _expand(zero.float(), group_size, k)
    q = torch.floor(weight.float() / s) + rectified_sigmoid(v) + z
    passes = (q >= 0) & (q <= float(max_code(bits)))
    return torch.where(passes, grad.float() * s * _rectified_sigmoid_grad(v), torch.zeros_like(v))


def adaround_regularizer_grad(v: torch.Tensor, beta: float) -> torch.Tensor:
    """Gradient of :func:`adaround_regularizer` with respect to V (analytic, no autograd)."""
    centred = 2.0 * rectified_sigmoid(v) - 1.0
    magnitude = centred.abs()
    dpow = torch.where(magnitude > 0, beta * magnitude.pow(beta - 1.0), torch.zeros_like(v))
    return -dpow * torch.sign(centred) * 2.0 * _rectified_sigmoid_grad(v)


def adaround_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2 h(V) - 1|^beta) as a float32 scalar."""
    return (1.0 - (2.0 * rectified_sigmoid(v) - 1.0).abs().pow(beta)).sum()


def adaround_init(weight, scale, group_size: int) -> torch.Tensor:
    """V such that h(V) equals the fractional part of weight / scale."""
    k = weight.shape[1]
    s = _expand(scale.float(), group_size, k)
    x = weight.float() / s
    frac = (x - torch.floor(x)).clamp(1e-6, 1 - 1e-6)
    return -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)


def adaround_harden(weight, v, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    """Final codes: floor(w / scale) + [h(V) >= 0.5] + zero, clamped."""
    k = weight.shape[1]
    s = _expand(scale.float(), group_size, k)
    z = _expand(zero.float(), group_size, k)
    up = (rectified_sigmoid(v) >= 0.5).float()
    q = torch.floor(weight.float() / s) + up + z
    return q.clamp(0, max_code(bits)).to(torch.uint8)


def pack(codes: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """LSB-first bit stream per row, rows padded to whole groups with code 0."""
    n, k = codes.shape
    c = F.pad(codes.to(torch.int32), (0, padded_in_features(k, group_size) - k))
    shifts = torch.arange(bits, dtype=torch.int32)
    stream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(n, -1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32))
    return (stream * weights).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, group_size: int, in_features: int) -> torch.Tensor:
    n = packed.shape[0]
    bit_values = (packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1
    stream = bit_values.reshape(n, -1, bits)
    codes = (stream << torch.arange(bits, dtype=torch.int32)).sum(-1)
    return codes[:, :in_features].to(torch.uint8)


def dequantize_packed(packed, scale, zero, bits: int, group_size: int, in_features: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes = unpack(packed, bits, group_size, in_features)
    return dequantize(codes, scale, zero, group_size).to(dtype)


def packed_matmul(x, packed, scale, zero, bias, bits: int, group_size: int, in_features: int):
    """y = x . dequant(W)^T + bias, computed in float32, returned in x's dtype."""
    w = dequantize_packed(packed, scale, zero, bits, group_size, in_features)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


DIGIT_BITS = 14
DIGIT_EXPONENT_RANGE = 100
# Largest group whose integer sums of code x digit products stay below 2^31, by code width.
DIGIT_MAX_GROUP = {4: 4096, 6: 1024, 8: 256}


def digit_rounded_activations(x: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """x ``[M, K]`` as the AVX-512 TILE16 GEMV multiplies bfloat16 activations with ``bits``-wide
    weights (docs/CPU.md): each group of ``group_size`` inputs of a row rounded, half to even, to a
    multiple of 2^(E - 14), where 2^E is the smallest power of two above the group's largest
    magnitude; exact for every bfloat16 within a factor 2^7 of that magnitude. float32 ``[M, K]``;
    unchanged where the kernel keeps floats for the call instead: a code width without an integer
    kernel (not 4, 6 or 8), a group larger than ``DIGIT_MAX_GROUP[bits]``, a non-finite value, or a
    nonzero group magnitude outside 2^+-100."""
    xf = x.float()
    if group_size > DIGIT_MAX_GROUP.get(bits, 0):
        return xf
    rows, k = xf.shape
    grouped = _grouped(xf, group_size)
    if not torch.isfinite(grouped).all():
        return xf
    largest = grouped.abs().amax(-1)
    _, exponent = torch.frexp(largest)  # largest = f 2^E, 0.5 <= f < 1
    nonzero = largest > 0
    if ((exponent.abs() > DIGIT_EXPONENT_RANGE) & nonzero).any():
        return xf
    quantum = torch.ldexp(torch.ones_like(largest), torch.where(nonzero, exponent, 0) - DIGIT_BITS).unsqueeze(-1)
    return (torch.round(grouped / quantum) * quantum).reshape(rows, -1)[:, :k]


def tile16_codes(packed, scale, zero, bits: int, in_features: int, out_features: int):
    """Integer codes uint8 ``[N, K]`` and scale / zero ``[N, groups]`` of TILE16 weights, read
    straight from the layout's definition (docs/FORMAT.md). 4 bits: byte 4r + b of step t of tile i
    holds codes 8t + 2b (low nibble) and 8t + 2b + 1 (high nibble) of row 16i + r. 6 bits: pair u
    holds its two steps' low nibbles so, then a vector whose lane r has the top two bits of code
    16u + 8p + s at bit 2(4p + s) and of code 16u + 8p + s + 4 at bit 16 + 2(4p + s). 8 bits:
    byte 4r + b of unit u of tile i is code 4u + b of row 16i + r."""
    tiles = packed.shape[0]
    bytes_ = packed.to(torch.int32)
    if bits == 8:
        units = packed.shape[1]
        rows = bytes_.view(tiles, units, 16, 4).permute(0, 2, 1, 3).reshape(tiles * 16, units * 4)
    elif bits == 4:
        steps = packed.shape[1]
        lanes = bytes_.view(tiles, steps, 16, 4)
        nibbles = torch.stack((lanes & 15, lanes >> 4), dim=-1).reshape(tiles, steps, 16, 8)
        rows = nibbles.permute(0, 2, 1, 3).reshape(tiles * 16, steps * 8)
    else:
        pairs = packed.shape[1]
        vectors = bytes_.view(tiles, pairs, 3, 16, 4)
        low = torch.stack((vectors[:, :, :2] & 15, vectors[:, :, :2] >> 4), dim=-1)  # [t, u, p, r, 4, 2]
        low = low.reshape(tiles, pairs, 2, 16, 8).permute(0, 3, 1, 2, 4).reshape(tiles, 16, pairs, 16)
        high_lane = (vectors[:, :, 2] << torch.tensor([0, 8, 16, 24])).sum(-1)  # [t, u, r]
        code = torch.arange(16)
        bit = 2 * (4 * (code // 8) + code % 4) + 16 * ((code % 8) // 4)
        high = (high_lane.unsqueeze(-1) >> bit) & 3  # [t, u, r, 16]
        rows = (low | high.permute(0, 2, 1, 3) << 4).reshape(tiles * 16, pairs * 16)

    def per_row(params):
        return params.permute(0, 2, 1).reshape(tiles * 16, -1)[:out_features]

    return rows[:out_features, :in_features].to(torch.uint8), per_row(scale), per_row(zero)


def tile16_matmul(x, packed, scale, zero, bias, bits: int, group_size: int, in_features: int, out_features: int):
    """y = x . dequant(W)^T + bias for TILE16 weights, in float32, returned in x's dtype."""
    q, s, z = tile16_codes(packed, scale, zero, bits, in_features, out_features)
    y = x.float() @ dequantize(q, s, z, group_size).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


__all__ = [
    "quant_params", "quantize", "dequantize", "fake_quantize", "fake_quantize_mask",
    "rectified_sigmoid", "adaround_forward", "adaround_backward", "adaround_regularizer",
    "adaround_regularizer_grad", "adaround_init",
    "adaround_harden", "pack", "unpack", "dequantize_packed", "packed_matmul",
    "tile16_codes", "tile16_matmul", "decode_attention", "rms_norm",
    "num_groups", "packed_row_bytes",
]


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask, scale: float):
    """Attention of one query token per sequence over its cache, in float32.

    query ``[B, Hq, D]``; key and value ``[B, Hkv, L, D]`` with Hq a multiple of Hkv, query head h
    reading key/value head ``h // (Hq // Hkv)`` (transformers' ``repeat_kv``); key_mask bool
    ``[B, L]`` (False hides a key) or None. Returns ``[B, Hq, D]`` in query's dtype; a sequence with
    no visible key gets zeros.
    """
    batch, q_heads, dim = query.shape
    kv_heads = key.shape[1]
    q = query.float().reshape(batch, kv_heads, q_heads // kv_heads, dim) * scale
    scores = q @ key.float().transpose(-1, -2)  # [B, Hkv, group, L]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if key_mask is not None:
        probs = probs.masked_fill(~key_mask.any(dim=-1)[:, None, None, None], 0.0)
    return (probs @ value.float()).reshape(batch, q_heads, dim).to(query.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama/Qwen RMSNorm of the rows of x ``[..., n]`` with weight ``[n]``: the mean square and the
    normalised row in float32, the row cast back to x's dtype before the weight multiplies it."""
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)
