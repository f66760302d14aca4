"""Bit packing of codes into the row-major packed format (docs/FORMAT.md), and dense weights
from packed ones."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._checks import (FLOAT_DTYPES, check_bits, check_group_size, check_packed, check_params,
                       check_same_device, check_tensor)
from .._extension import cuda_kernels
from ..format import packed_row_bytes
from ._common import _CUDA_OUTPUT_TYPE, _cpu, _integer_arguments, _stream, _threads


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


# CUDA (brecq_ext._cuda); without it, CUDA tensors run the reference in torch.
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


pack = _integer_arguments(pack, "brecq.pack", bits=1, group_size=2)
unpack = _integer_arguments(unpack, "brecq.unpack", bits=1, group_size=2, in_features=3)
dequantize_packed = _integer_arguments(dequantize_packed, "brecq.dequantize_packed", bits=3, group_size=4,
                                       in_features=5)
