"""In-memory layouts of packed weights (docs/FORMAT.md, "Tiled layout"; csrc/include/brecq/format.h).

* ``Layout.ROWS``: the row-major format of docs/FORMAT.md, the only form that is ever saved.
* ``Layout.TILE16``: 4-, 6- and 8-bit weights rearranged for the AVX-512 CPU kernels: a 64-byte
  vector holds consecutive codes of each of 16 consecutive output rows (8 codes at 4 and 6 bits, 4
  at 8 bits), so that a tile's outputs fill the lanes of one vector. The same codes, scales and
  zeros, moved (rows padded to a multiple of 16). 4- and 8-bit rows are transposed in 4-byte
  units; 6-bit codes keep their low nibbles as 4-bit steps and their top two bits in a third
  vector per pair of steps.

``to_tile16`` and ``from_tile16`` are exact inverses, written in torch so that they run on any
device.
"""
from __future__ import annotations

import enum

import torch
from torch import Tensor

from ._checks import check_bits, check_group_size, check_packed, check_params, check_shape, check_tensor
from .format import num_groups, padded_in_features

TILE_ROWS = 16  # output rows per tile: the 16 float32 lanes of a 512-bit vector
STEP_CODES = 8  # consecutive codes of one row in one step: one 32-bit lane of nibbles
STEP_BYTES = TILE_ROWS * STEP_CODES // 2  # a step of nibbles: 64 bytes
SIX_BIT_PAIR_BYTES = 3 * STEP_BYTES  # two steps of nibbles and one vector of top bits
TILE16_BITS = (4, 6, 8)


class Layout(enum.Enum):
    """How a QuantLinear holds its packed weights in memory."""

    ROWS = "rows"  # docs/FORMAT.md, row-major: every device, every bit width; the saved form
    TILE16 = "tile16"  # 4, 6 and 8 bits, CPU: the AVX-512 kernels' interleaving of 16 rows


def tile_count(out_features: int) -> int:
    return -(-out_features // TILE_ROWS)


def tile_steps(in_features: int, group_size: int) -> int:
    return padded_in_features(in_features, group_size) // STEP_CODES


def tile16_supports(bits: int, group_size: int) -> bool:
    """Whether TILE16 holds this bit width and group size (6 bits: steps go in pairs)."""
    return ((bits in (4, 8) and group_size % STEP_CODES == 0)
            or (bits == 6 and group_size % (2 * STEP_CODES) == 0))


def tile16_shapes(out_features: int, in_features: int, bits: int, group_size: int) -> tuple[tuple, tuple]:
    """Shapes of the TILE16 codes (uint8) and of its scale (float16) and zero (uint8)."""
    tiles, steps = tile_count(out_features), tile_steps(in_features, group_size)
    if bits == 6:
        codes = (tiles, steps // 2, SIX_BIT_PAIR_BYTES)
    else:  # 4-byte units of the packed rows: 8 codes a unit at 4 bits, 4 at 8 bits
        codes = (tiles, steps * bits // 4, STEP_BYTES)
    return codes, (tiles, num_groups(in_features, group_size), TILE_ROWS)


def preferred_layout(device, bits: int, group_size: int) -> Layout:
    """TILE16 for the layers it holds on a CPU whose active kernels are the AVX-512 or AVX2 ones
    (where its kernels are 1.3-4x faster than the row-major ones, bench/README.md and docs/CPU.md);
    ROWS everywhere else."""
    from ._extension import cpu_isa  # late: the compiled module is probed on first use

    on_cpu = torch.device(device if device is not None else "cpu").type == "cpu"
    return (Layout.TILE16 if on_cpu and tile16_supports(bits, group_size) and cpu_isa() in ("avx512", "avx512vnni", "avx2")
            else Layout.ROWS)


def _check_tile16_bits(op: str, bits: int, group_size: int) -> None:
    check_bits(op, bits)
    check_group_size(op, group_size, packed=True)
    if not tile16_supports(bits, group_size):
        raise ValueError(f"{op}: TILE16 holds 4- and 8-bit weights (group_size a multiple of {STEP_CODES}) and "
                         f"6-bit weights (group_size a multiple of {2 * STEP_CODES}), got bits={bits}, "
                         f"group_size={group_size}")


def check_tile16(op: str, packed, scale, zero, bits: int, group_size: int, in_features: int,
                 out_features: int) -> None:
    """packed / scale / zero are a TILE16 layer of out_features x in_features at bits, group_size."""
    _check_tile16_bits(op, bits, group_size)
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{op}: {name} must be a positive integer, got {value!r}")
    code_shape, param_shape = tile16_shapes(out_features, in_features, bits, group_size)
    unit = "step pairs, 192" if bits == 6 else "4-byte units, 64"
    meaning = (f"TILE16 layout of {out_features}x{in_features} {bits}-bit weights at group_size={group_size}: "
               f"packed [tiles, {unit}], scale and zero [tiles, groups, 16]")
    check_tensor(op, "packed", packed, (torch.uint8,), 3)
    check_shape(op, "packed", packed, code_shape, meaning)
    check_tensor(op, "scale", scale, (torch.float16,), 3)
    check_shape(op, "scale", scale, param_shape, meaning)
    check_tensor(op, "zero", zero, (torch.uint8,), 3)
    check_shape(op, "zero", zero, param_shape, meaning)


def _rows_to_tiles(t: Tensor, tiles: int) -> Tensor:
    """[n, X] -> [tiles, 16, X], zero rows appended."""
    out = t.new_zeros(tiles * TILE_ROWS, t.shape[1])
    out[: t.shape[0]] = t
    return out.view(tiles, TILE_ROWS, t.shape[1])


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


# 6 bits: bit position, in a lane of the pair's high-bit vector, of the top bits of code c (0..15)
# of the pair: field f = 4p + s for code 8p + s (s < 4) at 2f, and for code 8p + s + 4 at 16 + 2f.
_SIX_BIT_HIGH_SHIFT = [2 * (4 * (c // 8) + c % 4) + 16 * ((c % 8) // 4) for c in range(16)]


def _nibble_lanes(low: Tensor) -> Tensor:
    """[..., 8] nibbles (int32) -> [...] int32 lanes, nibble c at bits [4c, 4c+4)."""
    return (low << torch.arange(0, 32, 4, dtype=torch.int32, device=low.device)).sum(-1, dtype=torch.int32)


def to_tile16(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int,
              in_features: int) -> tuple[Tensor, Tensor, Tensor]:
    """Row-major weights (``packed`` uint8 ``[n, packed_row_bytes]``, ``scale`` float16 and ``zero``
    uint8 ``[n, groups]``) in the TILE16 layout: codes uint8 ``[tiles, row_bytes / 4, 64]`` (4 and 8
    bits) or ``[tiles, steps / 2, 192]`` (6 bits), scale and zero ``[tiles, groups, 16]``; rows past
    n are zero (scale 0, so they add nothing)."""
    op = "brecq_ext.layout.to_tile16"
    _check_tile16_bits(op, bits, group_size)
    check_packed(op, packed, None, in_features, bits, group_size)
    n = packed.shape[0]
    check_params(op, scale, zero, n, in_features, group_size)
    tiles, steps = tile_count(n), tile_steps(in_features, group_size)
    tiled_scale = _rows_to_tiles(scale, tiles).transpose(1, 2).contiguous()
    tiled_zero = _rows_to_tiles(zero, tiles).transpose(1, 2).contiguous()
    if bits != 6:
        # A row's lane in unit u is bytes 4u..4u+3 of its packed row: a transpose of 4-byte units,
        # moved as int32 (4x faster than as bytes).
        lanes = _rows_to_tiles(packed.contiguous().view(torch.int32), tiles).transpose(1, 2)
        return lanes.contiguous().view(torch.uint8).view(tiles, -1, STEP_BYTES), tiled_scale, tiled_zero
    from .ops import unpack  # late: ops imports this module

    codes = torch.zeros(tiles * TILE_ROWS, steps * STEP_CODES, dtype=torch.int32, device=packed.device)
    codes[:n, :in_features] = unpack(packed, bits, group_size, in_features).to(torch.int32)
    pairs = codes.view(tiles, TILE_ROWS, steps // 2, 16)
    low = _nibble_lanes((pairs & 15).view(tiles, TILE_ROWS, steps // 2, 2, 8))  # [tiles, 16, pairs, 2]
    shifts = torch.tensor(_SIX_BIT_HIGH_SHIFT, dtype=torch.int32, device=packed.device)
    high = ((pairs >> 4) << shifts).sum(-1, dtype=torch.int32)  # [tiles, 16, pairs]
    blocks = torch.cat((low, high.unsqueeze(-1)), dim=-1)  # [tiles, 16, pairs, 3]
    blocks = blocks.permute(0, 2, 3, 1).contiguous()  # [tiles, pairs, 3, 16]
    return blocks.view(torch.uint8).view(tiles, steps // 2, SIX_BIT_PAIR_BYTES), tiled_scale, tiled_zero


def from_tile16(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int, in_features: int,
                out_features: int) -> tuple[Tensor, Tensor, Tensor]:
    """The row-major ``packed``, ``scale`` and ``zero`` of TILE16 weights (inverse of to_tile16)."""
    check_tile16("brecq_ext.layout.from_tile16", packed, scale, zero, bits, group_size, in_features, out_features)
    params = (_untiled_rows(scale.transpose(1, 2), out_features), _untiled_rows(zero.transpose(1, 2), out_features))
    if bits != 6:
        lanes = packed.contiguous().view(torch.int32)  # [tiles, units, 16]: lane r of unit u
        return (_untiled_rows(lanes.transpose(1, 2), out_features).view(torch.uint8), *params)
    from .ops import pack  # late: ops imports this module

    tiles, pairs = packed.shape[0], packed.shape[1]
    blocks = packed.contiguous().view(torch.int32).view(tiles, pairs, 3, TILE_ROWS)
    nibble_shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    low = (blocks[:, :, :2, :, None] >> nibble_shifts) & 15  # [tiles, pairs, 2, 16, 8]
    low = low.permute(0, 3, 1, 2, 4).reshape(tiles, TILE_ROWS, pairs, 16)
    shifts = torch.tensor(_SIX_BIT_HIGH_SHIFT, dtype=torch.int32, device=packed.device)
    high = (blocks[:, :, 2, :, None] >> shifts) & 3  # [tiles, pairs, 16, 16 codes]
    codes = low | high.permute(0, 2, 1, 3) << 4  # [tiles, 16 rows, pairs, 16 codes]
    codes = _untiled_rows(codes.reshape(tiles, TILE_ROWS, -1), out_features)[:, :in_features]
    return (pack(codes.to(torch.uint8).contiguous(), bits, group_size), *params)
