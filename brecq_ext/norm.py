"""RMS normalisation as Llama/Qwen-family models define it (``torch.ops.brecq.rms_norm``), and
:class:`RMSNorm`, a drop-in for transformers' ``Qwen3RMSNorm``/``LlamaRMSNorm`` modules.

In eager mode transformers computes an RMSNorm with seven tensor ops: 18-20 us for one decode
token on this 2-core CPU, and a Qwen3-0.6B decode step has 113 of them. Replaced by identities
they cost 3.2 of 21.3 ms per step of the W4/W6 model (a scratch bound). The CPU kernel does it in
one call. Results equal the transformers formula's to rounding: float32 sums in another order,
and in bfloat16 at most an ulp of the output where that changes a rounding.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from . import reference
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._extension import cpu_kernels

log = logging.getLogger("brecq_ext")

OP = "brecq.rms_norm"
_CPU_DTYPES = (torch.float32, torch.bfloat16)
# transformers classes whose forward is reference.rms_norm (weight * dtype(x * rsqrt(mean(x^2) + eps))).
# Others (Gemma's 1 + weight, norms with a bias or other casts) are different formulas and are left alone.
RMS_NORM_CLASSES = ("Qwen3RMSNorm", "Qwen2RMSNorm", "LlamaRMSNorm", "MistralRMSNorm")


def _check(x, weight, eps) -> None:
    check_tensor(OP, "x", x, FLOAT_DTYPES)
    check_tensor(OP, "weight", weight, (x.dtype,), 1)
    if x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"{OP}: x must be [..., n] with n = weight's length {weight.shape[0]}, got {tuple(x.shape)}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{OP}: eps must be a finite number >= 0, got {eps!r}")
    check_same_device(OP, x=x, weight=weight)


@torch.library.custom_op("brecq::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * dtype(x * rsqrt(mean(x², -1) + eps))`` for x ``[..., n]`` and weight ``[n]`` of
    x's dtype; the mean and the normalised row in float32. Returns x's shape and dtype."""
    _check(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def _rms_norm_cpu(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The CPU implementation, on checked arguments."""
    kernels = cpu_kernels()
    n = weight.shape[0]
    if kernels is None or x.dtype not in _CPU_DTYPES or x.numel() == 0:
        return reference.rms_norm(x, weight, eps)
    if x.dim() == 2 and x.stride(1) == 1:
        rows, row_stride = x.shape[0], x.stride(0)
        out = torch.empty(x.shape, dtype=x.dtype)
    else:
        x = x.contiguous()
        rows, row_stride = x.numel() // n, n
        out = torch.empty_like(x)  # 1 us less than torch.empty(shape) on a decode call
    w = weight if weight.is_contiguous() else weight.contiguous()
    kernels.rms_norm(x.data_ptr(), x.dtype is torch.bfloat16, rows, n, row_stride, w.data_ptr(), eps, out.data_ptr(),
                     torch.get_num_threads())
    return out


@rms_norm.register_kernel("cpu")
def _(x, weight, eps):
    _check(x, weight, eps)
    return _rms_norm_cpu(x, weight, float(eps))


@rms_norm.register_fake
def _(x, weight, eps):
    _check(x, weight, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


class RMSNorm(nn.Module):
    """Drop-in for transformers' Llama/Qwen RMSNorm modules (same ``weight`` parameter and
    ``variance_epsilon``, so the same state dict). In eager inference (no grad mode) on the CPU,
    float32 or bfloat16 input with a weight of its dtype goes to the kernel; in grad mode, under
    torch.compile (which fuses the formula itself) and everywhere else it computes
    transformers' formula."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    @classmethod
    def from_module(cls, norm: nn.Module) -> RMSNorm:
        """Shares ``norm``'s weight parameter (no copy)."""
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if eps is None or not isinstance(getattr(norm, "weight", None), nn.Parameter) or norm.weight.dim() != 1:
            raise TypeError(f"RMSNorm.from_module: {type(norm).__name__} has no 1-D weight parameter and "
                            "variance_epsilon/eps")
        module = cls(norm.weight.shape[0], float(eps))
        module.weight = norm.weight
        return module

    def forward(self, x: Tensor) -> Tensor:
        weight = self._parameters["weight"]  # nn.Module attribute lookup costs ~0.5 us
        dtype = x.dtype
        # Ordered for cost (a decode call's whole budget is a few microseconds). Grad mode takes the
        # formula even for frozen weights: the kernel is for inference.
        if ((dtype is torch.bfloat16 or dtype is torch.float32) and dtype is weight.dtype
                and not torch.is_grad_enabled() and x.is_cpu and weight.is_cpu and not torch.compiler.is_compiling()
                and x.shape[-1:] == weight.shape):
            return _rms_norm_cpu(x, weight, self.variance_epsilon)
        return reference.rms_norm(x, weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def fuse_rms_norms_(model: nn.Module, classes: tuple = RMS_NORM_CLASSES) -> int:
    """Replace every module of ``model`` whose class name is in ``classes`` by :class:`RMSNorm`,
    sharing its weight; returns how many were replaced. The model's outputs stay those of
    transformers' formula to rounding, and its state dict keeps its keys."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ in classes:
                setattr(parent, name, RMSNorm.from_module(child))
                replaced += 1
    log.info("fuse_rms_norms_: %d RMSNorm modules now run as one call each", replaced)
    return replaced
