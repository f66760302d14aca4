"""Quantization parameters, quantize, dequantize and fake-quantize: the grouped asymmetric
quantizer every method builds on (docs/FORMAT.md: per-group float16 scale, uint8 zero point)."""

from __future__ import annotations

import enum

import torch
from torch import Tensor

from .. import reference
from .._checks import (FLOAT_DTYPES, check_bits, check_group_size, check_params, check_same_device,
                       check_tensor)
from .._extension import cuda_kernels
from ..format import num_groups
from ._common import _cpu, _integer_arguments, _stream, _threads


MAX_SEARCH_STEPS = 100  # shrink factors 1.00 .. 0.01


class Clipping(enum.Enum):
    """How the per-group range is chosen."""

    MINMAX = "minmax"
    MSE = "mse"  # search over shrink factors of the range for the least squared error

    @property
    def search_steps(self) -> int:
        return 0 if self is Clipping.MINMAX else 80


def _check_quant_params(weight, bits, group_size, search_steps):
    op = "brecq.quant_params"
    check_tensor(op, "weight", weight, FLOAT_DTYPES, 2)
    check_bits(op, bits)
    check_group_size(op, group_size)
    if not isinstance(search_steps, int) or not 0 <= search_steps <= MAX_SEARCH_STEPS:
        raise ValueError(f"{op}: search_steps must be an integer in [0, {MAX_SEARCH_STEPS}], got {search_steps!r}")


MAX_FLOAT16 = 65504.0


def _check_finite(op: str, name: str, t: Tensor) -> None:
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise ValueError(f"{op}: {name} contains NaN or Inf (first at index {tuple(bad)}); "
                         "quantization parameters need finite weights")


def _check_scale_range(op: str, weight: Tensor, bits: int, group_size: int) -> None:
    """A group whose range needs a step beyond float16's largest (65504) would be clamped and lose
    most of its values silently (weights of magnitude ~1e6 at 4 bits): refuse it, naming where."""
    n, k = weight.shape
    limit = MAX_FLOAT16 * ((1 << bits) - 1)
    if float(weight.abs().amax()) * 2 <= limit:  # no group can reach it: skip the per-group pass
        return
    w = torch.nn.functional.pad(weight.float(), (0, num_groups(k, group_size) * group_size - k))
    groups = w.view(n, -1, group_size)
    span = groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)
    bad = (span > limit).nonzero()
    if bad.numel():
        row, group = bad[0].tolist()
        raise ValueError(f"{op}: weight row {row}, group {group} spans {float(span[row, group]):.4g}, which needs a "
                         f"scale above float16's 65504 at {bits} bits; rescale the layer (or keep it unquantized)")


@torch.library.custom_op("brecq::quant_params", mutates_args=())
def quant_params(weight: Tensor, bits: int, group_size: int, search_steps: int = 0) -> tuple[Tensor, Tensor]:
    """Per-group (scale float16, zero uint8), each ``[N, ceil(K / group_size)]``, of weight ``[N, K]``."""
    _check_quant_params(weight, bits, group_size, search_steps)
    _check_finite("brecq.quant_params", "weight", weight)
    _check_scale_range("brecq.quant_params", weight, bits, group_size)
    return reference.quant_params(weight, bits, group_size, search_steps)


@quant_params.register_kernel("cpu")
def _(weight, bits, group_size, search_steps=0):
    _check_quant_params(weight, bits, group_size, search_steps)
    _check_finite("brecq.quant_params", "weight", weight)
    _check_scale_range("brecq.quant_params", weight, bits, group_size)
    kernels = _cpu()
    if kernels is None:
        return reference.quant_params(weight, bits, group_size, search_steps)
    w = weight.float().contiguous()
    n, k = w.shape
    scale = torch.empty(n, num_groups(k, group_size), dtype=torch.float16)
    zero = torch.empty(n, num_groups(k, group_size), dtype=torch.uint8)
    kernels.quant_params(w.data_ptr(), n, k, bits, group_size, search_steps, scale.data_ptr(),
                         zero.data_ptr(), _threads())
    return scale, zero


@quant_params.register_fake
def _(weight, bits, group_size, search_steps=0):
    _check_quant_params(weight, bits, group_size, search_steps)
    n, k = weight.shape
    g = num_groups(k, group_size)
    return weight.new_empty(n, g, dtype=torch.float16), weight.new_empty(n, g, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------------
# quantize / dequantize / fake-quantize
# ------------------------------------------------------------------------------------------------
def _check_quantize(op, weight, scale, zero, bits, group_size, weight_name="weight"):
    check_tensor(op, weight_name, weight, FLOAT_DTYPES, 2)
    check_bits(op, bits)
    check_group_size(op, group_size)
    check_params(op, scale, zero, weight.shape[0], weight.shape[1], group_size)
    check_same_device(op, **{weight_name: weight, "scale": scale, "zero": zero})


@torch.library.custom_op("brecq::quantize", mutates_args=())
def quantize(weight: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int) -> Tensor:
    """Integer codes uint8 ``[N, K]``: clamp(round(w / scale) + zero, 0, 2^bits - 1)."""
    _check_quantize("brecq.quantize", weight, scale, zero, bits, group_size)
    return reference.quantize(weight, scale, zero, bits, group_size)


@quantize.register_kernel("cpu")
def _(weight, scale, zero, bits, group_size):
    _check_quantize("brecq.quantize", weight, scale, zero, bits, group_size)
    kernels = _cpu()
    if kernels is None:
        return reference.quantize(weight, scale, zero, bits, group_size)
    w, s, z = weight.float().contiguous(), scale.contiguous(), zero.contiguous()
    codes = torch.empty(w.shape, dtype=torch.uint8)
    kernels.quantize(w.data_ptr(), s.data_ptr(), z.data_ptr(), w.shape[0], w.shape[1], bits,
                     group_size, codes.data_ptr(), _threads())
    return codes


@quantize.register_fake
def _(weight, scale, zero, bits, group_size):
    _check_quantize("brecq.quantize", weight, scale, zero, bits, group_size)
    return torch.empty_like(weight, dtype=torch.uint8)


def _check_dequantize(codes, scale, zero, group_size):
    op = "brecq.dequantize"
    check_tensor(op, "codes", codes, (torch.uint8,), 2)
    check_group_size(op, group_size)
    check_params(op, scale, zero, codes.shape[0], codes.shape[1], group_size)
    check_same_device(op, codes=codes, scale=scale, zero=zero)


@torch.library.custom_op("brecq::dequantize", mutates_args=())
def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """float32 ``[N, K]`` = scale * (codes - zero)."""
    _check_dequantize(codes, scale, zero, group_size)
    return reference.dequantize(codes, scale, zero, group_size)


@dequantize.register_kernel("cpu")
def _(codes, scale, zero, group_size):
    _check_dequantize(codes, scale, zero, group_size)
    kernels = _cpu()
    if kernels is None:
        return reference.dequantize(codes, scale, zero, group_size)
    c, s, z = codes.contiguous(), scale.contiguous(), zero.contiguous()
    out = torch.empty(c.shape, dtype=torch.float32)
    kernels.dequantize(c.data_ptr(), s.data_ptr(), z.data_ptr(), c.shape[0], c.shape[1], group_size,
                       out.data_ptr(), _threads())
    return out


@dequantize.register_fake
def _(codes, scale, zero, group_size):
    _check_dequantize(codes, scale, zero, group_size)
    return torch.empty_like(codes, dtype=torch.float32)


@torch.library.custom_op("brecq::fake_quantize", mutates_args=())
def fake_quantize(weight: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int) -> Tensor:
    """dequantize(quantize(weight)) in weight's dtype; gradient passes straight through where the
    value is not clipped."""
    _check_quantize("brecq.fake_quantize", weight, scale, zero, bits, group_size)
    return reference.fake_quantize(weight, scale, zero, bits, group_size)


@fake_quantize.register_kernel("cpu")
def _(weight, scale, zero, bits, group_size):
    _check_quantize("brecq.fake_quantize", weight, scale, zero, bits, group_size)
    kernels = _cpu()
    if kernels is None:
        return reference.fake_quantize(weight, scale, zero, bits, group_size)
    w, s, z = weight.float().contiguous(), scale.contiguous(), zero.contiguous()
    out = torch.empty(w.shape, dtype=torch.float32)
    kernels.fake_quantize(w.data_ptr(), s.data_ptr(), z.data_ptr(), w.shape[0], w.shape[1], bits,
                          group_size, out.data_ptr(), _threads())
    return out.to(weight.dtype)


@fake_quantize.register_fake
def _(weight, scale, zero, bits, group_size):
    _check_quantize("brecq.fake_quantize", weight, scale, zero, bits, group_size)
    return torch.empty_like(weight)


def _fake_quantize_setup(ctx, inputs, output):
    weight, scale, zero, bits, group_size = inputs
    ctx.save_for_backward(weight, scale, zero)
    ctx.bits, ctx.group_size = bits, group_size


def _fake_quantize_backward(ctx, grad):
    weight, scale, zero = ctx.saved_tensors
    mask = reference.fake_quantize_mask(weight, scale, zero, ctx.bits, ctx.group_size)
    return grad * mask.to(grad.dtype), None, None, None, None


fake_quantize.register_autograd(_fake_quantize_backward, setup_context=_fake_quantize_setup)


# CUDA (brecq_ext._cuda); without it, CUDA tensors run the reference in torch.
@quant_params.register_kernel("cuda")
def _(weight, bits, group_size, search_steps=0):
    _check_quant_params(weight, bits, group_size, search_steps)
    _check_finite("brecq.quant_params", "weight", weight)  # one host sync: bad weights must not pass
    _check_scale_range("brecq.quant_params", weight, bits, group_size)
    cuda = cuda_kernels()
    if cuda is None:
        return reference.quant_params(weight, bits, group_size, search_steps)
    w = weight.float().contiguous()
    n, k = w.shape
    scale = torch.empty(n, num_groups(k, group_size), dtype=torch.float16, device=w.device)
    zero = torch.empty(n, num_groups(k, group_size), dtype=torch.uint8, device=w.device)
    cuda.quant_params(w.data_ptr(), n, k, bits, group_size, search_steps, scale.data_ptr(), zero.data_ptr(),
                      _stream(w))
    return scale, zero


@quantize.register_kernel("cuda")
def _(weight, scale, zero, bits, group_size):
    _check_quantize("brecq.quantize", weight, scale, zero, bits, group_size)
    cuda = cuda_kernels()
    if cuda is None:
        return reference.quantize(weight, scale, zero, bits, group_size)
    w, s, z = weight.float().contiguous(), scale.contiguous(), zero.contiguous()
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    cuda.quantize(w.data_ptr(), s.data_ptr(), z.data_ptr(), w.shape[0], w.shape[1], bits, group_size,
                  codes.data_ptr(), _stream(w))
    return codes


@dequantize.register_kernel("cuda")
def _(codes, scale, zero, group_size):
    _check_dequantize(codes, scale, zero, group_size)
    cuda = cuda_kernels()
    if cuda is None:
        return reference.dequantize(codes, scale, zero, group_size)
    c, s, z = codes.contiguous(), scale.contiguous(), zero.contiguous()
    out = torch.empty(c.shape, dtype=torch.float32, device=c.device)
    cuda.dequantize(c.data_ptr(), s.data_ptr(), z.data_ptr(), c.shape[0], c.shape[1], group_size, out.data_ptr(),
                    _stream(c))
    return out


@fake_quantize.register_kernel("cuda")
def _(weight, scale, zero, bits, group_size):
    _check_quantize("brecq.fake_quantize", weight, scale, zero, bits, group_size)
    cuda = cuda_kernels()
    if cuda is None:
        return reference.fake_quantize(weight, scale, zero, bits, group_size)
    w, s, z = weight.float().contiguous(), scale.contiguous(), zero.contiguous()
    out = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    cuda.fake_quantize(w.data_ptr(), s.data_ptr(), z.data_ptr(), w.shape[0], w.shape[1], bits, group_size,
                       out.data_ptr(), _stream(w))
    return out.to(weight.dtype)


quant_params = _integer_arguments(quant_params, "brecq.quant_params", bits=1, group_size=2, search_steps=3)
quantize = _integer_arguments(quantize, "brecq.quantize", bits=3, group_size=4)
dequantize = _integer_arguments(dequantize, "brecq.dequantize", group_size=3)
fake_quantize = _integer_arguments(fake_quantize, "brecq.fake_quantize", bits=3, group_size=4)
