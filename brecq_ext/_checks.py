"""Argument validation shared by the real and fake implementations of every op.

Errors name the op, the argument and the expected form, so that bad input never reaches a kernel.
"""
from __future__ import annotations

import torch

from .format import GROUP_SIZE_MULTIPLE, MAX_BITS, MIN_BITS, num_groups, packed_row_bytes

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_bits(op: str, bits: int) -> None:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{op}: bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def check_group_size(op: str, group_size: int, packed: bool = False) -> None:
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{op}: group_size must be a positive integer, got {group_size!r}")
    if packed and group_size % GROUP_SIZE_MULTIPLE:
        raise ValueError(
            f"{op}: group_size must be a multiple of {GROUP_SIZE_MULTIPLE} for the packed format "
            f"(groups start on byte boundaries), got {group_size}")


def check_tensor(op: str, name: str, t, dtypes, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        expected = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype {expected}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple, meaning: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)} ({meaning}), got {tuple(t.shape)}")


def check_same_device(op: str, **tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")


def check_params(op: str, scale, zero, n: int, k: int, group_size: int) -> None:
    check_tensor(op, "scale", scale, (torch.float16,), 2)
    check_tensor(op, "zero", zero, (torch.uint8,), 2)
    groups = num_groups(k, group_size)
    check_shape(op, "scale", scale, (n, groups), f"[out_features, ceil({k} / {group_size})]")
    check_shape(op, "zero", zero, (n, groups), f"[out_features, ceil({k} / {group_size})]")


def check_packed(op: str, packed, n: int | None, in_features: int, bits: int, group_size: int) -> None:
    check_tensor(op, "packed", packed, (torch.uint8,), 2)
    if not isinstance(in_features, int) or in_features <= 0:
        raise ValueError(f"{op}: in_features must be a positive integer, got {in_features!r}")
    row_bytes = packed_row_bytes(in_features, group_size, bits)
    expected_n = packed.shape[0] if n is None else n
    if tuple(packed.shape) != (expected_n, row_bytes):
        raise ValueError(
            f"{op}: packed must have shape ({expected_n}, {row_bytes}) for in_features={in_features}, "
            f"bits={bits}, group_size={group_size}, got {tuple(packed.shape)}")
