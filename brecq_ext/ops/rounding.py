"""AdaRound's learned rounding: the soft-rounded weight and its gradient, and the regularizer that
pushes each rounding variable to 0 or 1 (Nagel et al., 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._checks import check_same_device, check_shape, check_tensor
from .._extension import cuda_kernels
from ._common import _cpu, _integer_arguments, _stream, _threads
from .quantizer import _check_quantize


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


# CUDA (brecq_ext._cuda); without it, CUDA tensors run the reference in torch.
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


adaround_forward = _integer_arguments(adaround_forward, "brecq.adaround_forward", bits=4, group_size=5)
