"""In-memory layouts of packed weights (docs/FORMAT.md, "Tiled layout"; csrc/include/brecq/format.h).

* ``Layout.ROWS``: the row-major format of docs/FORMAT.md, the only form that is ever saved.
* ``Layout.TILE16``: 4-bit weights rearranged for the AVX-512 CPU kernel: one 64-byte step holds
  eight consecutive codes of each of 16 consecutive output rows, so that a tile's outputs fill the
  lanes of one vector. The same codes, scales and zeros, moved (rows padded to a multiple of 16).

``to_tile16`` and ``from_tile16`` are exact inverses, written in torch so that they run on any
device.
"""
from __future__ import annotations

import enum

import torch
from torch import Tensor

from ._checks import check_group_size, check_packed, check_params, check_shape, check_tensor
from .format import num_groups, padded_in_features

TILE_ROWS = 16  # output rows per tile: the 16 float32 lanes of a 512-bit vector
STEP_CODES = 8  # consecutive codes of one row in one step: one 32-bit lane of 4-bit codes
STEP_BYTES = TILE_ROWS * STEP_CODES // 2
TILE16_BITS = 4


class Layout(enum.Enum):
    """How a QuantLinear holds its packed weights in memory."""

    ROWS = "rows"  # docs/FORMAT.md, row-major: every device, every bit width; the saved form
    TILE16 = "tile16"  # 4-bit only, CPU: the AVX-512 kernel's interleaving of 16 rows


def tile_count(out_features: int) -> int:
    return -(-out_features // TILE_ROWS)


def tile_steps(in_features: int, group_size: int) -> int:
    return padded_in_features(in_features, group_size) // STEP_CODES


def tile16_shapes(out_features: int, in_features: int, group_size: int) -> tuple[tuple, tuple]:
    """Shapes of the TILE16 codes (uint8) and of its scale (float16) and zero (uint8)."""
    tiles = tile_count(out_features)
    return ((tiles, tile_steps(in_features, group_size), STEP_BYTES),
            (tiles, num_groups(in_features, group_size), TILE_ROWS))


def preferred_layout(device, bits: int) -> Layout:
    """TILE16 for 4-bit layers on a CPU whose active kernels are the AVX-512 ones (where it is
    1.3-2x faster, bench/README.md); ROWS everywhere else."""
    from ._extension import cpu_isa  # late: the compiled module is probed on first use

    on_cpu = torch.device(device if device is not None else "cpu").type == "cpu"
    return Layout.TILE16 if on_cpu and bits == TILE16_BITS and cpu_isa() == "avx512" else Layout.ROWS


def check_tile16(op: str, packed, scale, zero, out_features: int, in_features: int, group_size: int) -> None:
    """packed / scale / zero are a TILE16 layer of out_features x in_features at group_size."""
    check_group_size(op, group_size, packed=True)
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{op}: {name} must be a positive integer, got {value!r}")
    code_shape, param_shape = tile16_shapes(out_features, in_features, group_size)
    meaning = (f"TILE16 layout of {out_features}x{in_features} 4-bit weights at group_size={group_size}: "
               "packed [tiles, steps, 64], scale and zero [tiles, groups, 16]")
    check_tensor(op, "packed", packed, (torch.uint8,), 3)
    check_shape(op, "packed", packed, code_shape, meaning)
    check_tensor(op, "scale", scale, (torch.float16,), 3)
    check_shape(op, "scale", scale, param_shape, meaning)
    check_tensor(op, "zero", zero, (torch.uint8,), 3)
    check_shape(op, "zero", zero, param_shape, meaning)


def to_tile16(packed: Tensor, scale: Tensor, zero: Tensor, in_features: int,
              group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Row-major 4-bit weights (``packed`` uint8 ``[n, packed_row_bytes]``, ``scale`` float16 and
    ``zero`` uint8 ``[n, groups]``) in the TILE16 layout: codes uint8 ``[tiles, steps, 64]``,
    scale and zero ``[tiles, groups, 16]``; rows past n are zero (scale 0, so they add nothing)."""
    op = "brecq_ext.layout.to_tile16"
    check_group_size(op, group_size, packed=True)
    check_packed(op, packed, None, in_features, TILE16_BITS, group_size)
    n = packed.shape[0]
    check_params(op, scale, zero, n, in_features, group_size)
    tiles, steps, groups = tile_count(n), tile_steps(in_features, group_size), num_groups(in_features, group_size)

    def padded(t: Tensor) -> Tensor:
        out = t.new_zeros(tiles * TILE_ROWS, t.shape[1])
        out[:n] = t
        return out

    # A row's 4-byte lane of step t is bytes 4t..4t+3 of its packed row: a transpose of 4-byte units,
    # moved as int32 (4x faster than as bytes).
    codes = padded(packed).view(torch.int32).view(tiles, TILE_ROWS, steps).transpose(1, 2)
    codes = codes.contiguous().view(torch.uint8).view(tiles, steps, STEP_BYTES)
    tiled_scale = padded(scale).view(tiles, TILE_ROWS, groups).transpose(1, 2).contiguous()
    tiled_zero = padded(zero).view(tiles, TILE_ROWS, groups).transpose(1, 2).contiguous()
    return codes, tiled_scale, tiled_zero


def from_tile16(packed: Tensor, scale: Tensor, zero: Tensor, out_features: int, in_features: int,
                group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The row-major ``packed``, ``scale`` and ``zero`` of TILE16 weights (inverse of to_tile16)."""
    check_tile16("brecq_ext.layout.from_tile16", packed, scale, zero, out_features, in_features, group_size)
    lanes = packed.contiguous().view(torch.int32)  # [tiles, steps, 16]: lane r of step t
    return (_untiled_rows(lanes.transpose(1, 2), out_features).view(torch.uint8),
            _untiled_rows(scale.transpose(1, 2), out_features), _untiled_rows(zero.transpose(1, 2), out_features))


def _untiled_rows(per_tile: Tensor, out_features: int) -> Tensor:
    """``[tiles, 16, X]`` (any strides) as a new contiguous ``[out_features, X]``, in one copy.
    A tensor of its own, exactly out_features rows: state_dict() hands these out, and safetensors
    refuses tensors that cover only part of their storage."""
    tiles, _, width = per_tile.shape
    out = per_tile.new_empty(out_features, width)
    whole = out_features // TILE_ROWS
    out[: whole * TILE_ROWS].view(whole, TILE_ROWS, width).copy_(per_tile[:whole])
    if whole < tiles:
        out[whole * TILE_ROWS:].copy_(per_tile[whole, : out_features - whole * TILE_ROWS])
    return out
