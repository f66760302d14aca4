"""The kernel library's operators, declared once as torch custom ops (``torch.ops.brecq.*``).

Each op has a schema and a fake (meta) implementation here, a CPU implementation in the compiled
module (``brecq_ext._C``, raw pointers, no libtorch), and a default implementation for every other
device that is the pure-PyTorch reference (CUDA kernels replace it op by op). Arguments are checked
in both the real and the fake implementation, so bad input fails with a clear message under
``torch.compile`` too.

Tensor layouts are those of docs/FORMAT.md: weights ``[out_features, in_features]``, per-group
``scale`` float16 and ``zero`` uint8 ``[out_features, ceil(in_features / group_size)]``.
"""
from __future__ import annotations

import enum
import functools
import threading
from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._checks import (FLOAT_DTYPES, check_bits, check_group_size, check_packed, check_params,
                      check_same_device, check_shape, check_tensor)
from ._extension import cpu_kernels, cuda_kernels
from .format import num_groups, packed_row_bytes
from .layout import TILE_ROWS, check_tile16, from_tile16

# Rows of activations up to which packed_matmul streams weights (GEMV); above, it dequantizes
# tiles into a workspace and runs a dense GEMM on them.
GEMV_MAX_ROWS = 8
# Elements of the dense workspace tile of the GEMM path on the CPU (16 MiB in float32, 8 MiB in
# bfloat16): every Qwen3-0.6B linear but the lm_head in one tile, so one dequantization and one
# product, which at 512 rows ran 0-8 % faster in bfloat16 than tiles of 1 Mi elements (a scratch
# round-robin loop over the five shapes, not kept; float32 within -3..+7 %).
GEMM_TILE_ELEMENTS = 1 << 22
# On CUDA one launch of the dequantization kernel and one matmul beat many small ones: up to 64 Mi
# elements (128 MiB in bfloat16) of workspace per call.
CUDA_GEMM_TILE_ELEMENTS = 1 << 26
MAX_SEARCH_STEPS = 100  # shrink factors 1.00 .. 0.01


class Clipping(enum.Enum):
    """How the per-group range is chosen."""

    MINMAX = "minmax"
    MSE = "mse"  # search over shrink factors of the range for the least squared error

    @property
    def search_steps(self) -> int:
        return 0 if self is Clipping.MINMAX else 80


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _cpu():
    return cpu_kernels()


# ------------------------------------------------------------------------------------------------
# quantization parameters
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# AdaRound
# ------------------------------------------------------------------------------------------------
def _check_adaround(op, weight, v, scale, zero, bits, group_size):
    check_tensor(op, "weight", weight, (torch.float32,), 2)
    check_tensor(op, "v", v, (torch.float32,), 2)
    check_shape(op, "v", v, tuple(weight.shape), "one rounding variable per weight")
    _check_quantize(op, weight, scale, zero, bits, group_size)
    check_same_device(op, weight=weight, v=v)


@torch.library.custom_op("brecq::adaround_forward", mutates_args=())
def adaround_forward(weight: Tensor, v: Tensor, scale: Tensor, zero: Tensor, bits: int,
                     group_size: int) -> Tensor:
    """Soft-rounded weight float32 ``[N, K]``:
    scale * (clamp(floor(w / scale) + h(V) + zero, 0, qmax) - zero), h the rectified sigmoid."""
    _check_adaround("brecq.adaround_forward", weight, v, scale, zero, bits, group_size)
    return reference.adaround_forward(weight, v, scale, zero, bits, group_size)


@adaround_forward.register_kernel("cpu")
def _(weight, v, scale, zero, bits, group_size):
    _check_adaround("brecq.adaround_forward", weight, v, scale, zero, bits, group_size)
    kernels = _cpu()
    if kernels is None:
        return reference.adaround_forward(weight, v, scale, zero, bits, group_size)
    w, vv, s, z = weight.contiguous(), v.contiguous(), scale.contiguous(), zero.contiguous()
    out = torch.empty_like(w)
    kernels.adaround_forward(w.data_ptr(), vv.data_ptr(), s.data_ptr(), z.data_ptr(), w.shape[0],
                             w.shape[1], bits, group_size, out.data_ptr(), _threads())
    return out


@adaround_forward.register_fake
def _(weight, v, scale, zero, bits, group_size):
    _check_adaround("brecq.adaround_forward", weight, v, scale, zero, bits, group_size)
    return torch.empty_like(weight)


@torch.library.custom_op("brecq::adaround_backward", mutates_args=())
def adaround_backward(grad: Tensor, weight: Tensor, v: Tensor, scale: Tensor, zero: Tensor,
                      bits: int, group_size: int) -> Tensor:
    """Gradient of adaround_forward with respect to V, float32 ``[N, K]``."""
    _check_adaround("brecq.adaround_backward", weight, v, scale, zero, bits, group_size)
    check_shape("brecq.adaround_backward", "grad", grad, tuple(weight.shape), "like weight")
    return reference.adaround_backward(grad, weight, v, scale, zero, bits, group_size)


@adaround_backward.register_kernel("cpu")
def _(grad, weight, v, scale, zero, bits, group_size):
    _check_adaround("brecq.adaround_backward", weight, v, scale, zero, bits, group_size)
    check_shape("brecq.adaround_backward", "grad", grad, tuple(weight.shape), "like weight")
    kernels = _cpu()
    if kernels is None:
        return reference.adaround_backward(grad, weight, v, scale, zero, bits, group_size)
    g = grad.float().contiguous()
    w, vv, s, z = weight.contiguous(), v.contiguous(), scale.contiguous(), zero.contiguous()
    out = torch.empty_like(w)
    kernels.adaround_backward(g.data_ptr(), w.data_ptr(), vv.data_ptr(), s.data_ptr(), z.data_ptr(),
                              w.shape[0], w.shape[1], bits, group_size, out.data_ptr(), _threads())
    return out


@adaround_backward.register_fake
def _(grad, weight, v, scale, zero, bits, group_size):
    _check_adaround("brecq.adaround_backward", weight, v, scale, zero, bits, group_size)
    return torch.empty_like(weight)


def _adaround_setup(ctx, inputs, output):
    weight, v, scale, zero, bits, group_size = inputs
    ctx.save_for_backward(weight, v, scale, zero)
    ctx.bits, ctx.group_size = bits, group_size


def _adaround_backward_rule(ctx, grad):
    weight, v, scale, zero = ctx.saved_tensors
    gv = adaround_backward(grad, weight, v, scale, zero, ctx.bits, ctx.group_size)
    return None, gv, None, None, None, None


adaround_forward.register_autograd(_adaround_backward_rule, setup_context=_adaround_setup)


def _check_regularizer(v, beta):
    op = "brecq.adaround_regularizer"
    check_tensor(op, "v", v, (torch.float32,))
    if not beta > 0:
        raise ValueError(f"{op}: beta must be positive, got {beta!r}")


def _reference_regularizer(v, beta):
    # Analytic gradient: autograd is not available inside an op's implementation.
    return reference.adaround_regularizer(v, beta), reference.adaround_regularizer_grad(v, beta)


@torch.library.custom_op("brecq::adaround_regularizer", mutates_args=())
def adaround_regularizer(v: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(sum(1 - |2 h(V) - 1|^beta) as a float32 scalar, its gradient with respect to V), fused.
    Use :func:`rounding_loss` for the differentiable scalar."""
    _check_regularizer(v, beta)
    return _reference_regularizer(v, beta)


@adaround_regularizer.register_kernel("cpu")
def _(v, beta):
    _check_regularizer(v, beta)
    kernels = _cpu()
    if kernels is None:
        return _reference_regularizer(v, beta)
    vv = v.contiguous()
    grad = torch.empty_like(vv)
    total = kernels.adaround_regularizer(vv.data_ptr(), vv.numel(), float(beta), grad.data_ptr(), _threads())
    return torch.tensor(total, dtype=torch.float32), grad


@adaround_regularizer.register_fake
def _(v, beta):
    _check_regularizer(v, beta)
    return v.new_empty((), dtype=torch.float32), torch.empty_like(v)


def _regularizer_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _regularizer_backward(ctx, grad_loss, grad_of_grad):
    (gv,) = ctx.saved_tensors
    return grad_loss * gv, None


adaround_regularizer.register_autograd(_regularizer_backward, setup_context=_regularizer_setup)


def rounding_loss(v: Tensor, beta: float) -> Tensor:
    """Differentiable sum(1 - |2 h(V) - 1|^beta) (AdaRound's rounding regulariser)."""
    return adaround_regularizer(v, beta)[0]


# ------------------------------------------------------------------------------------------------
# packing
# ------------------------------------------------------------------------------------------------
def _check_pack(codes, bits, group_size):
    op = "brecq.pack"
    check_tensor(op, "codes", codes, (torch.uint8,), 2)
    check_bits(op, bits)
    check_group_size(op, group_size, packed=True)


def _raise_invalid_codes(codes, bits):
    bad = int((codes > (1 << bits) - 1).sum())
    raise ValueError(f"brecq.pack: codes must lie in [0, {(1 << bits) - 1}] for bits={bits}; "
                     f"{bad} codes are larger")


@torch.library.custom_op("brecq::pack", mutates_args=())
def pack(codes: Tensor, bits: int, group_size: int) -> Tensor:
    """Packed uint8 ``[N, packed_row_bytes(K, group_size, bits)]`` from codes uint8 ``[N, K]``."""
    _check_pack(codes, bits, group_size)
    if bool((codes > (1 << bits) - 1).any()):
        _raise_invalid_codes(codes, bits)
    return reference.pack(codes, bits, group_size)


@pack.register_kernel("cpu")
def _(codes, bits, group_size):
    _check_pack(codes, bits, group_size)
    kernels = _cpu()
    if kernels is None:
        if bool((codes > (1 << bits) - 1).any()):
            _raise_invalid_codes(codes, bits)
        return reference.pack(codes, bits, group_size)
    c = codes.contiguous()
    n, k = c.shape
    out = torch.empty(n, packed_row_bytes(k, group_size, bits), dtype=torch.uint8)
    if kernels.pack(c.data_ptr(), n, k, bits, group_size, out.data_ptr(), _threads()):
        _raise_invalid_codes(c, bits)
    return out


@pack.register_fake
def _(codes, bits, group_size):
    _check_pack(codes, bits, group_size)
    n, k = codes.shape
    return codes.new_empty(n, packed_row_bytes(k, group_size, bits), dtype=torch.uint8)


def _check_unpack(packed, bits, group_size, in_features):
    op = "brecq.unpack"
    check_bits(op, bits)
    check_group_size(op, group_size, packed=True)
    check_packed(op, packed, None, in_features, bits, group_size)


@torch.library.custom_op("brecq::unpack", mutates_args=())
def unpack(packed: Tensor, bits: int, group_size: int, in_features: int) -> Tensor:
    """Codes uint8 ``[N, in_features]`` from packed weights."""
    _check_unpack(packed, bits, group_size, in_features)
    return reference.unpack(packed, bits, group_size, in_features)


@unpack.register_kernel("cpu")
def _(packed, bits, group_size, in_features):
    _check_unpack(packed, bits, group_size, in_features)
    kernels = _cpu()
    if kernels is None:
        return reference.unpack(packed, bits, group_size, in_features)
    p = packed.contiguous()
    out = torch.empty(p.shape[0], in_features, dtype=torch.uint8)
    kernels.unpack(p.data_ptr(), p.shape[0], in_features, bits, group_size, out.data_ptr(), _threads())
    return out


@unpack.register_fake
def _(packed, bits, group_size, in_features):
    _check_unpack(packed, bits, group_size, in_features)
    return packed.new_empty(packed.shape[0], in_features, dtype=torch.uint8)


def _check_dequantize_packed(packed, scale, zero, bits, group_size, in_features, dtype):
    op = "brecq.dequantize_packed"
    check_bits(op, bits)
    check_group_size(op, group_size, packed=True)
    check_packed(op, packed, None, in_features, bits, group_size)
    check_params(op, scale, zero, packed.shape[0], in_features, group_size)
    check_same_device(op, packed=packed, scale=scale, zero=zero)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be float32, bfloat16 or float16, got {dtype}")


_CUDA_OUTPUT_TYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@torch.library.custom_op("brecq::dequantize_packed", mutates_args=())
def dequantize_packed(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int,
                      in_features: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Dense ``[N, in_features]`` weight in ``dtype`` from packed weights."""
    _check_dequantize_packed(packed, scale, zero, bits, group_size, in_features, dtype)
    cuda = cuda_kernels() if packed.is_cuda else None
    if cuda is None:
        return reference.dequantize_packed(packed, scale, zero, bits, group_size, in_features, dtype)
    p, s, z = packed.contiguous(), scale.contiguous(), zero.contiguous()
    out = torch.empty(p.shape[0], in_features, dtype=dtype, device=p.device)
    cuda.dequantize_packed(p.data_ptr(), s.data_ptr(), z.data_ptr(), p.shape[0], in_features, bits,
                           group_size, out.data_ptr(), _CUDA_OUTPUT_TYPE[dtype], _stream(p))
    return out


def _dequantize_packed_cpu_into(kernels, packed, scale, zero, bits, group_size, in_features, out):
    kernels.dequantize_packed(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), packed.shape[0],
                              in_features, bits, group_size, out.data_ptr(),
                              out.dtype == torch.bfloat16, _threads())


@dequantize_packed.register_kernel("cpu")
def _(packed, scale, zero, bits, group_size, in_features, dtype=torch.float32):
    _check_dequantize_packed(packed, scale, zero, bits, group_size, in_features, dtype)
    kernels = _cpu()
    if kernels is None:
        return reference.dequantize_packed(packed, scale, zero, bits, group_size, in_features, dtype)
    p, s, z = packed.contiguous(), scale.contiguous(), zero.contiguous()
    kernel_dtype = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    out = torch.empty(p.shape[0], in_features, dtype=kernel_dtype)
    _dequantize_packed_cpu_into(kernels, p, s, z, bits, group_size, in_features, out)
    return out.to(dtype)


@dequantize_packed.register_fake
def _(packed, scale, zero, bits, group_size, in_features, dtype=torch.float32):
    _check_dequantize_packed(packed, scale, zero, bits, group_size, in_features, dtype)
    return packed.new_empty(packed.shape[0], in_features, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# packed matmul
# ------------------------------------------------------------------------------------------------
def _check_matmul(x, packed, scale, zero, bias, bits, group_size, in_features):
    op = "brecq.packed_matmul"
    check_tensor(op, "x", x, FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{op}: x must have shape [..., {in_features}] (in_features), got {tuple(x.shape)}")
    check_bits(op, bits)
    check_group_size(op, group_size, packed=True)
    check_packed(op, packed, None, in_features, bits, group_size)
    check_params(op, scale, zero, packed.shape[0], in_features, group_size)
    if bias is not None:
        check_tensor(op, "bias", bias, FLOAT_DTYPES, 1)
        check_shape(op, "bias", bias, (packed.shape[0],), "[out_features]")
    check_same_device(op, x=x, packed=packed, scale=scale, zero=zero, bias=bias)


_thread_workspaces = threading.local()


def _cpu_workspace(rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """A ``[rows, cols]`` tensor of ``dtype`` on the CPU, a view of a buffer this thread reuses.

    The GEMM path's workspace is megabytes (up to GEMM_TILE_ELEMENTS elements). glibc serves an
    allocation that large with a fresh mmap and unmaps it on free, so a new workspace per call
    page-faults on every first touch: a fifth of a Qwen3-0.6B-shaped CPU prefill went there
    (bench/README.md). One buffer per thread and dtype, grown as needed, avoids that; callers must
    not return it or keep it past the call (no op result aliases it)."""
    buffers = getattr(_thread_workspaces, "by_dtype", None)
    if buffers is None:
        buffers = _thread_workspaces.by_dtype = {}
    need = rows * cols
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < need:
        with torch.inference_mode(False):  # an inference tensor could not be written outside that mode
            buffer = buffers[dtype] = torch.empty(need, dtype=dtype)
    return buffer[:need].view(rows, cols)


def _gemm_tiled(x2, n, bias, in_features, dequantize_rows, row_align=1):
    """y [M, N] = x2 [M, K] . dequant(W)^T + bias, one workspace tile of W rows at a time;
    ``dequantize_rows(start, stop, out)`` writes the dense rows [start, stop) of W into ``out``
    (start is a multiple of ``row_align``)."""
    m = x2.shape[0]
    compute = torch.bfloat16 if x2.dtype == torch.bfloat16 else torch.float32
    if x2.device.type == "cuda" and x2.dtype == torch.float16:
        compute = torch.float16
    xc = x2.to(compute)
    b = bias.to(compute) if bias is not None else None
    tile_elements = GEMM_TILE_ELEMENTS if x2.device.type == "cpu" else CUDA_GEMM_TILE_ELEMENTS
    tile = max(1, min(n, tile_elements // in_features))
    if tile < n:
        tile = max(row_align, tile - tile % row_align)
    workspace = (_cpu_workspace(tile, in_features, compute) if x2.device.type == "cpu" else
                 torch.empty(tile, in_features, dtype=compute, device=x2.device))
    # Which product form is fastest, measured side by side on the CPU (Zen 4, 2 threads; section 4
    # of bench/cpu_paths.py): for bfloat16, x . W^T (F.linear), 2.5x faster at 9 rows and 1.2x at
    # 512; for float32, W . x^T into a transposed output, 1.2x faster at 64 rows (0.75-0.9x at 9
    # and 512). On CUDA: F.linear for a single tile, W . x^T for the tiles of very large layers
    # (the form measured on the H100).
    cpu = x2.device.type == "cpu"
    if (cpu and compute == torch.float32) or (not cpu and tile < n):
        y_t = torch.empty(n, m, dtype=compute, device=x2.device)
        for start in range(0, n, tile):
            stop = min(n, start + tile)
            w_tile = workspace[: stop - start]
            dequantize_rows(start, stop, w_tile)
            torch.mm(w_tile, xc.t(), out=y_t[start:stop])
        y = y_t.t()
        if b is not None:
            y = y + b
        return y.to(x2.dtype).contiguous()
    if tile == n:  # one tile: one product, written in its final layout
        dequantize_rows(0, n, workspace)
        return torch.nn.functional.linear(xc, workspace, b).to(x2.dtype)
    y = torch.empty(m, n, dtype=compute, device=x2.device)
    for start in range(0, n, tile):
        stop = min(n, start + tile)
        w_tile = workspace[: stop - start]
        dequantize_rows(start, stop, w_tile)
        y[:, start:stop] = torch.nn.functional.linear(xc, w_tile, b[start:stop] if b is not None else None)
    return y.to(x2.dtype)


def _dequantize_rows_any_device(packed, scale, zero, bits, group_size, in_features):
    def run(start, stop, out):
        out.copy_(dequantize_packed(packed[start:stop], scale[start:stop], zero[start:stop], bits, group_size,
                                    in_features, out.dtype))
    return run


@torch.library.custom_op("brecq::packed_matmul", mutates_args=())
def packed_matmul(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, bias: Optional[Tensor],
                  bits: int, group_size: int, in_features: int) -> Tensor:
    """y ``[..., N]`` = x ``[..., K]`` . dequant(W)^T + bias, in x's dtype (float32 accumulation)."""
    _check_matmul(x, packed, scale, zero, bias, bits, group_size, in_features)
    x2 = x.reshape(-1, in_features)
    y = _gemm_tiled(x2, packed.shape[0], bias, in_features,
                    _dequantize_rows_any_device(packed, scale, zero, bits, group_size, in_features))
    return y.reshape(*x.shape[:-1], packed.shape[0])


def _gemv_cpu(kernel, x, m, x_stride, packed, scale, zero, bias, n, bits, group_size, in_features):
    """y [m, n] in x's dtype from m rows of x (float32 or bfloat16, unit inner stride, rows
    ``x_stride`` elements apart) on validated, contiguous packed/scale/zero and float32 bias (or None),
    by ``kernel``: the compiled ``packed_gemv`` (row-major weights) or ``tiled_gemv`` (TILE16), which
    take the same arguments. The ops' path, for any row stride; module forwards in eager inference
    take ``_eager_cpu_gemv``, which makes the same call inline for contiguous x."""
    dtype = x.dtype
    y = torch.empty(m, n, dtype=dtype)
    is_bf16 = dtype is torch.bfloat16
    kernel(x.data_ptr(), is_bf16, m, x_stride, packed.data_ptr(), scale.data_ptr(), zero.data_ptr(),
           0 if bias is None else bias.data_ptr(), n, in_features, bits, group_size, y.data_ptr(), is_bf16,
           torch.get_num_threads())
    return y


def _gemv_operands(x2, bias):
    """x2 ``[m, K]`` and bias as the CPU GEMV kernels take them: float32 or bfloat16 rows with unit
    inner stride, a contiguous float32 bias (or None)."""
    if x2.dtype == torch.float16:
        x2 = x2.float()
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]):
        x2 = x2.contiguous()
    return x2, bias.float().contiguous() if bias is not None else None


@packed_matmul.register_kernel("cpu")
def _packed_matmul_cpu(x, packed, scale, zero, bias, bits, group_size, in_features):
    _check_matmul(x, packed, scale, zero, bias, bits, group_size, in_features)
    kernels = _cpu()
    if kernels is None:
        return reference.packed_matmul(x, packed, scale, zero, bias, bits, group_size, in_features)
    n = packed.shape[0]
    p, s, z = packed.contiguous(), scale.contiguous(), zero.contiguous()
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    if m <= GEMV_MAX_ROWS:
        x2, b = _gemv_operands(x2, bias)
        y = _gemv_cpu(kernels.packed_gemv, x2, m, x2.stride(0), p, s, z, b, n, bits, group_size, in_features)
        return y.to(x.dtype).reshape(*x.shape[:-1], n)

    def dequantize_rows(start, stop, out):
        _dequantize_packed_cpu_into(kernels, p[start:stop], s[start:stop], z[start:stop], bits, group_size,
                                    in_features, out)

    y = _gemm_tiled(x2, n, bias, in_features, dequantize_rows)
    return y.reshape(*x.shape[:-1], n)


@packed_matmul.register_fake
def _(x, packed, scale, zero, bias, bits, group_size, in_features):
    _check_matmul(x, packed, scale, zero, bias, bits, group_size, in_features)
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def _packed_linear_setup(ctx, inputs, output):
    # Both packed matmul ops take (x, packed, scale, zero, bias, *layer arguments).
    x, packed, scale, zero, bias, *layer = inputs
    ctx.save_for_backward(packed, scale, zero)
    ctx.layer, ctx.x_dtype, ctx.has_bias = tuple(layer), x.dtype, bias is not None


def _packed_linear_backward(dense_weight):
    """The backward of y = x . W^T + bias, with W (float32 ``[N, K]``) = dense_weight(packed,
    scale, zero, *layer arguments): gradients to x and bias; the weights are constants."""
    def backward(ctx, grad):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.float() @ dense_weight(*ctx.saved_tensors, *ctx.layer)).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return (grad_x, None, None, None, grad_bias) + (None,) * len(ctx.layer)
    return backward


def _row_major_dense_weight(packed, scale, zero, bits, group_size, in_features):
    return dequantize_packed(packed, scale, zero, bits, group_size, in_features, torch.float32)


packed_matmul.register_autograd(_packed_linear_backward(_row_major_dense_weight), setup_context=_packed_linear_setup)


def _eager_cpu_gemv(kernel, x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, bias: Optional[Tensor],
                    bits: int, group_size: int, in_features: int, out_features: int) -> Optional[Tensor]:
    """y ``[..., out_features]`` from ``kernel`` (the compiled ``packed_gemv`` or ``tiled_gemv``)
    when x and bias can go to it as they are: a contiguous decode-sized float32 or bfloat16 x
    ``[..., in_features]``, and a float32 bias or none; else None. The weights must already be
    validated. Written for cost, in one frame: a decode-sized W4 layer streams in 10-40 us, and
    each Python call (~0.2 us), tensor attribute (40-100 ns) or view (0.9 us) here is memory time
    lost. torch.empty (1 us) is its only allocation, made in x's shape, so no view follows."""
    dtype = x.dtype
    if dtype is torch.bfloat16:
        is_bf16 = True
    elif dtype is torch.float32:
        is_bf16 = False
    else:
        return None
    shape = x.shape
    if not shape or shape[-1] != in_features or (bias is not None and bias.dtype is not torch.float32):
        return None
    rows = x.numel() // in_features
    if not 0 < rows <= GEMV_MAX_ROWS or not x.is_contiguous():
        return None
    dims = len(shape)  # 2 (a batch of rows) and 3 (transformers' [batch, tokens, features]) written out: 0.4 us less
    if dims == 2:
        y = torch.empty(rows, out_features, dtype=dtype)
    elif dims == 3:
        y = torch.empty(shape[0], shape[1], out_features, dtype=dtype)
    else:
        y = torch.empty(*shape[:-1], out_features, dtype=dtype)
    kernel(x.data_ptr(), is_bf16, rows, in_features, packed.data_ptr(), scale.data_ptr(), zero.data_ptr(),
           0 if bias is None else bias.data_ptr(), out_features, in_features, bits, group_size, y.data_ptr(), is_bf16,
           torch.get_num_threads())
    return y


def linear(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, bias: Optional[Tensor], bits: int,
           group_size: int, in_features: int, weights_checked: bool = False) -> Tensor:
    """packed_matmul for module forwards. In eager inference (no autograd, not compiling) it calls
    the CPU or CUDA implementation directly: the custom-op dispatcher costs 20-40 us a call, more
    than a whole decode-sized GEMV on either device. ``weights_checked=True`` (QuantLinear, whose
    buffers are validated when it is built or loaded) also skips re-validating packed/scale/zero/bias
    for contiguous decode inputs. Everywhere else (autograd, torch.compile, CUDA graphs captured
    through torch.compile) it is the op. The checks are ordered and chosen for cost: this path is
    a few microseconds of Python per call, comparable to a small layer's whole GEMV."""
    if (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return packed_matmul(x, packed, scale, zero, bias, bits, group_size, in_features)
    if x.is_cpu:
        kernels = _cpu()
        if weights_checked and kernels is not None:
            y = _eager_cpu_gemv(kernels.packed_gemv, x, packed, scale, zero, bias, bits, group_size, in_features,
                                packed.shape[0])
            if y is not None:
                return y
        return _packed_matmul_cpu(x, packed, scale, zero, bias, bits, group_size, in_features)
    if x.is_cuda:
        cuda = cuda_kernels()
        if (weights_checked and cuda is not None and x.dtype in _CUDA_OUTPUT_TYPE and x.is_contiguous()
                and x.dim() >= 1 and x.shape[-1] == in_features and x.device == packed.device
                and (bias is None or bias.dtype == torch.float32)):
            m, n = x.numel() // in_features, packed.shape[0]
            stream = _stream(x)
            if 0 < m and cuda.packed_gemv_supported(x.data_ptr(), packed.data_ptr(), _CUDA_OUTPUT_TYPE[x.dtype],
                                                    bits, group_size, m, in_features, in_features):
                y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
                cuda.packed_gemv(x.data_ptr(), _CUDA_OUTPUT_TYPE[x.dtype], m, in_features, packed.data_ptr(),
                                 scale.data_ptr(), zero.data_ptr(), bias.data_ptr() if bias is not None else 0,
                                 n, in_features, bits, group_size, y.data_ptr(), stream)
                return y
    return packed_matmul(x, packed, scale, zero, bias, bits, group_size, in_features)


# ------------------------------------------------------------------------------------------------
# packed matmul on TILE16 weights (brecq_ext.layout; the AVX-512 CPU kernels' layout)
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# CUDA implementations (brecq_ext._cuda); without it, CUDA tensors run the reference in torch.
# ------------------------------------------------------------------------------------------------
def _stream(t: Tensor) -> int:
    """Handle of torch's current stream on t's device, with that device made current for the CUDA
    module (it links its own runtime, whose notion of the current device is separate from torch's)."""
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    cuda_kernels().use_device(index)
    raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what inductor calls; fastest
    if raw_stream is not None:
        return raw_stream(index)
    return torch.cuda.current_stream(t.device).cuda_stream


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


@pack.register_kernel("cuda")
def _(codes, bits, group_size):
    _check_pack(codes, bits, group_size)
    if bool((codes > (1 << bits) - 1).any()):  # one host sync: out-of-range codes must not be packed
        _raise_invalid_codes(codes, bits)
    cuda = cuda_kernels()
    if cuda is None:
        return reference.pack(codes, bits, group_size)
    c = codes.contiguous()
    n, k = c.shape
    out = torch.empty(n, packed_row_bytes(k, group_size, bits), dtype=torch.uint8, device=c.device)
    cuda.pack(c.data_ptr(), n, k, bits, group_size, out.data_ptr(), _stream(c))
    return out


@unpack.register_kernel("cuda")
def _(packed, bits, group_size, in_features):
    _check_unpack(packed, bits, group_size, in_features)
    cuda = cuda_kernels()
    if cuda is None:
        return reference.unpack(packed, bits, group_size, in_features)
    p = packed.contiguous()
    out = torch.empty(p.shape[0], in_features, dtype=torch.uint8, device=p.device)
    cuda.unpack(p.data_ptr(), p.shape[0], in_features, bits, group_size, out.data_ptr(), _stream(p))
    return out


@packed_matmul.register_kernel("cuda")
def _(x, packed, scale, zero, bias, bits, group_size, in_features):
    _check_matmul(x, packed, scale, zero, bias, bits, group_size, in_features)
    cuda = cuda_kernels()
    x2 = x.reshape(-1, in_features)
    m, n = x2.shape[0], packed.shape[0]
    stream = _stream(x) if cuda is not None else 0  # before packed_gemv_supported, which asks the device
    if x2.stride(-1) != 1 or (m > 1 and x2.stride(0) < in_features):
        x2 = x2.contiguous()
    p, s, z = packed.contiguous(), scale.contiguous(), zero.contiguous()
    if cuda is not None and 0 < m and cuda.packed_gemv_supported(
            x2.data_ptr(), p.data_ptr(), _CUDA_OUTPUT_TYPE[x.dtype], bits, group_size, m, in_features,
            x2.stride(0)):
        b = bias.float().contiguous() if bias is not None else None
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        cuda.packed_gemv(x2.data_ptr(), _CUDA_OUTPUT_TYPE[x.dtype], m, x2.stride(0), p.data_ptr(), s.data_ptr(),
                         z.data_ptr(), b.data_ptr() if b is not None else 0, n, in_features, bits, group_size,
                         y.data_ptr(), stream)
        return y.reshape(*x.shape[:-1], n)
    if cuda is None:
        dequantize_rows = _dequantize_rows_any_device(p, s, z, bits, group_size, in_features)
    else:
        def dequantize_rows(start, stop, out):  # straight into the workspace
            cuda.dequantize_packed(p[start].data_ptr(), s[start].data_ptr(), z[start].data_ptr(), stop - start,
                                   in_features, bits, group_size, out.data_ptr(), _CUDA_OUTPUT_TYPE[out.dtype],
                                   stream)
    y = _gemm_tiled(x2, n, bias, in_features, dequantize_rows)
    return y.reshape(*x.shape[:-1], n)


@adaround_forward.register_kernel("cuda")
def _(weight, v, scale, zero, bits, group_size):
    _check_adaround("brecq.adaround_forward", weight, v, scale, zero, bits, group_size)
    cuda = cuda_kernels()
    if cuda is None:
        return reference.adaround_forward(weight, v, scale, zero, bits, group_size)
    w, vv, s, z = weight.contiguous(), v.contiguous(), scale.contiguous(), zero.contiguous()
    out = torch.empty_like(w)
    cuda.adaround_forward(w.data_ptr(), vv.data_ptr(), s.data_ptr(), z.data_ptr(), w.shape[0], w.shape[1], bits,
                          group_size, out.data_ptr(), _stream(w))
    return out


@adaround_backward.register_kernel("cuda")
def _(grad, weight, v, scale, zero, bits, group_size):
    _check_adaround("brecq.adaround_backward", weight, v, scale, zero, bits, group_size)
    check_shape("brecq.adaround_backward", "grad", grad, tuple(weight.shape), "like weight")
    cuda = cuda_kernels()
    if cuda is None:
        return reference.adaround_backward(grad, weight, v, scale, zero, bits, group_size)
    g = grad.float().contiguous()
    w, vv, s, z = weight.contiguous(), v.contiguous(), scale.contiguous(), zero.contiguous()
    out = torch.empty_like(w)
    cuda.adaround_backward(g.data_ptr(), w.data_ptr(), vv.data_ptr(), s.data_ptr(), z.data_ptr(), w.shape[0],
                           w.shape[1], bits, group_size, out.data_ptr(), _stream(w))
    return out


@adaround_regularizer.register_kernel("cuda")
def _(v, beta):
    _check_regularizer(v, beta)
    cuda = cuda_kernels()
    if cuda is None:
        return _reference_regularizer(v, beta)
    vv = v.contiguous()
    grad = torch.empty_like(vv)
    loss = torch.empty((), dtype=torch.float32, device=v.device)
    cuda.adaround_regularizer(vv.data_ptr(), vv.numel(), float(beta), grad.data_ptr(), loss.data_ptr(), _stream(vv))
    return loss, grad


def _integer_arguments(op, qualname: str, **positions: int):
    """``op`` behind a check that its integer arguments are Python ints: torch's schema would refuse
    ``bits=4.0`` with a dispatcher error that names neither the rule nor the range. The torch op
    itself stays ``torch.ops.brecq.*`` (and ``.op`` here); hot decode paths do not go through this."""
    @functools.wraps(op._init_fn)
    def call(*args, **kwargs):
        for name, index in positions.items():
            value = kwargs[name] if name in kwargs else args[index] if index < len(args) else None
            if value is None or (isinstance(value, int) and not isinstance(value, bool)):
                continue
            if name == "bits":
                check_bits(qualname, value)
            if name == "group_size":
                check_group_size(qualname, value)
            raise ValueError(f"{qualname}: {name} must be an integer, got {value!r}")
        return op(*args, **kwargs)

    call.op = op
    return call


quant_params = _integer_arguments(quant_params, "brecq.quant_params", bits=1, group_size=2, search_steps=3)
quantize = _integer_arguments(quantize, "brecq.quantize", bits=3, group_size=4)
dequantize = _integer_arguments(dequantize, "brecq.dequantize", group_size=3)
fake_quantize = _integer_arguments(fake_quantize, "brecq.fake_quantize", bits=3, group_size=4)
adaround_forward = _integer_arguments(adaround_forward, "brecq.adaround_forward", bits=4, group_size=5)
pack = _integer_arguments(pack, "brecq.pack", bits=1, group_size=2)
unpack = _integer_arguments(unpack, "brecq.unpack", bits=1, group_size=2, in_features=3)
dequantize_packed = _integer_arguments(dequantize_packed, "brecq.dequantize_packed", bits=3, group_size=4,
                                       in_features=5)

# Import-time probe: a missing compiled module is reported once, when the ops are first loaded.
cpu_kernels()

__all__ = [
    "Clipping", "quant_params", "quantize", "dequantize", "fake_quantize", "adaround_forward",
    "adaround_backward", "adaround_regularizer", "rounding_loss", "pack", "unpack",
    "dequantize_packed", "packed_matmul", "linear", "tile16_matmul", "tile16_linear", "GEMV_MAX_ROWS",
]
