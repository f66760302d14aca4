"""The packed matmul on row-major packed weights: a streaming GEMV for decode-sized inputs, a
dequantize-then-GEMM path on workspace tiles above, and ``linear``, the eager fast path for
module forwards."""

from __future__ import annotations

import functools
import threading
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._checks import (FLOAT_DTYPES, check_bits, check_group_size, check_packed, check_params,
                       check_same_device, check_shape, check_tensor)
from .._extension import cuda_kernels
from ._common import _CUDA_OUTPUT_TYPE, _cpu, _stream
from .packing import _dequantize_packed_cpu_into, dequantize_packed


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


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16_products() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512_BF16, which brecq's "avx512" level
    requires). Without it torch's bfloat16 matmul is several times slower than its float32 one (an
    Emerald Rapids VM that hides BF16: 59 against 291 GFLOPS at 512x1024x3072, 2 threads), so the
    GEMM path multiplies in float32 there: float32 weights, unrounded, as the reference and the
    GEMV kernels use them."""
    from .._extension import detected_cpu_isa

    return detected_cpu_isa() == "avx512"


def _gemm_dtype(x2: Tensor) -> torch.dtype:
    """The dtype the GEMM path multiplies x2 in (and its workspace holds the weights in)."""
    if x2.dtype == torch.bfloat16:
        return torch.bfloat16 if x2.device.type != "cpu" or _cpu_has_bf16_products() else torch.float32
    if x2.device.type == "cuda" and x2.dtype == torch.float16:
        return torch.float16
    return torch.float32


def _gemm_tiled(x2, n, bias, in_features, dequantize_rows, row_align=1):
    """y [M, N] = x2 [M, K] . dequant(W)^T + bias, one workspace tile of W rows at a time;
    ``dequantize_rows(start, stop, out)`` writes the dense rows [start, stop) of W into ``out``
    (start is a multiple of ``row_align``)."""
    m = x2.shape[0]
    compute = _gemm_dtype(x2)
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


# CUDA (brecq_ext._cuda); without it, CUDA tensors run the reference in torch.
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
