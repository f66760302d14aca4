"""The packed matmul on TILE16 weights (brecq_ext.layout; the AVX-512 CPU kernels' layout), with the
row-major op on the weights rearranged back wherever no TILE16 kernel runs."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._checks import FLOAT_DTYPES, check_same_device, check_shape, check_tensor
from ..layout import TILE_ROWS, check_tile16, from_tile16
from ._common import _cpu, _threads
from .matmul import (GEMV_MAX_ROWS, _eager_cpu_gemv, _gemm_tiled, _gemv_cpu, _gemv_operands,
                     _packed_linear_backward, _packed_linear_setup, packed_matmul)
from .packing import dequantize_packed


def _check_tile16_matmul(x, packed, scale, zero, bias, bits, group_size, in_features, out_features):
    op = "brecq.tile16_matmul"
    check_tensor(op, "x", x, FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{op}: x must have shape [..., {in_features}] (in_features), got {tuple(x.shape)}")
    check_tile16(op, packed, scale, zero, bits, group_size, in_features, out_features)
    if bias is not None:
        check_tensor(op, "bias", bias, FLOAT_DTYPES, 1)
        check_shape(op, "bias", bias, (out_features,), "[out_features]")
    check_same_device(op, x=x, packed=packed, scale=scale, zero=zero, bias=bias)


@torch.library.custom_op("brecq::tile16_matmul", mutates_args=())
def tile16_matmul(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, bias: Optional[Tensor], bits: int,
                  group_size: int, in_features: int, out_features: int) -> Tensor:
    """y ``[..., out_features]`` = x ``[..., in_features]`` . dequant(W)^T + bias for 4-, 6- or 8-bit W
    in the TILE16 layout (packed uint8 ``[tiles, row_bytes / 4, 64]`` at 4 and 8 bits or
    ``[tiles, steps / 2, 192]`` at 6, scale float16 and zero uint8 ``[tiles, groups, 16]``;
    brecq_ext.layout). Devices without a TILE16 kernel run the row-major op on the weights
    rearranged back."""
    _check_tile16_matmul(x, packed, scale, zero, bias, bits, group_size, in_features, out_features)
    rows, s, z = from_tile16(packed, scale, zero, bits, group_size, in_features, out_features)
    return packed_matmul(x, rows, s, z, bias, bits, group_size, in_features)


@tile16_matmul.register_kernel("cpu")
def _tile16_matmul_cpu(x, packed, scale, zero, bias, bits, group_size, in_features, out_features):
    _check_tile16_matmul(x, packed, scale, zero, bias, bits, group_size, in_features, out_features)
    kernels = _cpu()
    if kernels is None:
        return reference.tile16_matmul(x, packed, scale, zero, bias, bits, group_size, in_features, out_features)
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], out_features)
    if m > GEMV_MAX_ROWS:
        # The GEMM path, on workspace tiles of whole TILE16 tiles dequantized straight from the
        # layout (rearranging a whole layer back to row-major first cost 3-10 % at 512 rows).
        p, s, z = packed.contiguous(), scale.contiguous(), zero.contiguous()

        def dequantize_rows(start, stop, out):
            first = start // TILE_ROWS
            kernels.dequantize_tiled(p[first].data_ptr(), s[first].data_ptr(), z[first].data_ptr(), stop - start,
                                     in_features, bits, group_size, out.data_ptr(), out.dtype == torch.bfloat16,
                                     _threads())

        y = _gemm_tiled(x2, out_features, bias, in_features, dequantize_rows, row_align=TILE_ROWS)
        return y.reshape(*x.shape[:-1], out_features)
    x2, b = _gemv_operands(x2, bias)
    y = _gemv_cpu(kernels.tiled_gemv, x2, m, x2.stride(0), packed.contiguous(), scale.contiguous(), zero.contiguous(),
                  b, out_features, bits, group_size, in_features)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


@tile16_matmul.register_fake
def _(x, packed, scale, zero, bias, bits, group_size, in_features, out_features):
    _check_tile16_matmul(x, packed, scale, zero, bias, bits, group_size, in_features, out_features)
    return x.new_empty(*x.shape[:-1], out_features)


def _tile16_dense_weight(packed, scale, zero, bits, group_size, in_features, out_features):
    rows, s, z = from_tile16(packed, scale, zero, bits, group_size, in_features, out_features)
    return dequantize_packed(rows, s, z, bits, group_size, in_features, torch.float32)


tile16_matmul.register_autograd(_packed_linear_backward(_tile16_dense_weight), setup_context=_packed_linear_setup)


def tile16_linear(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, bias: Optional[Tensor], bits: int,
                  group_size: int, in_features: int, out_features: int, weights_checked: bool = False) -> Tensor:
    """tile16_matmul for module forwards, calling the CPU kernel directly in eager inference (as
    ``linear`` does for row-major weights)."""
    if (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return tile16_matmul(x, packed, scale, zero, bias, bits, group_size, in_features, out_features)
    if x.is_cpu:
        kernels = _cpu()
        if weights_checked and kernels is not None:
            y = _eager_cpu_gemv(kernels.tiled_gemv, x, packed, scale, zero, bias, bits, group_size, in_features,
                                out_features)
            if y is not None:
                return y
        return _tile16_matmul_cpu(x, packed, scale, zero, bias, bits, group_size, in_features, out_features)
    return tile16_matmul(x, packed, scale, zero, bias, bits, group_size, in_features, out_features)
