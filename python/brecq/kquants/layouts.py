"""llama.cpp's block types as quantization grids: parse their bytes into (scale, zero, offset, codes),
write new codes into them, and dequantize them.

Every type here stores, for each group of ``group`` consecutive inputs of one row, a step ``s``
and either a zero point ``z`` (symmetric types) or an offset ``m`` (K-types with mins, Q5_1)::

    value = s * (code - z) - m          code in [0, 2^bits - 1]

with ``s >= 0`` (a negative llama.cpp scale is stored as ``s = -d`` with the codes mirrored,
``code = qmax - q``, which gives the same float product). The float operations are the ones
llama.cpp's dequantizers do, so :func:`dequantize` equals ``gguf.quants.dequantize`` bit for bit.

Byte layouts (llama.cpp ``ggml-common.h``; float16 fields little-endian; bits per weight in
brackets; ``d``, ``dmin`` float16 super-block scales):

* Q4_0 (4.5)  per 32: ``d``, ``qs[16]``; input j in the low nibble of ``qs[j]``, j+16 in the high;
  ``value = d * (q - 8)``.
* Q4_1 (5.0)  per 32: ``d``, ``m``, ``qs[16]`` as Q4_0; ``value = d * q + m``.
* Q5_0 (5.5)  per 32: ``d``, ``qh`` uint32, ``qs[16]``; low nibbles as Q4_0, bit 4 of input j in
  bit j of ``qh``; ``value = d * (q - 16)``.
* Q5_1 (6.0)  per 32: ``d``, ``m``, ``qh``, ``qs[16]`` as Q5_0; ``value = d * q + m``.
* Q8_0 (8.5)  per 32: ``d``, ``qs[32]`` int8; ``value = d * q``.
* Q4_K (4.5)  per 256: ``d``, ``dmin``, ``scales[12]`` (eight 6-bit scales and mins), ``qs[128]``;
  64-input chunk c holds sub-blocks 2c (low nibbles of ``qs[32c:32c+32]``) and 2c+1 (high);
  ``value = (d * sc) * q - (dmin * mn)`` per sub-block of 32.
* Q5_K (5.5)  per 256: ``d``, ``dmin``, ``scales[12]``, ``qh[32]``, ``qs[128]``; as Q4_K, with bit 4
  of input ``64c + l`` in bit 2c of ``qh[l]`` and of ``64c + 32 + l`` in bit 2c+1.
* Q6_K (6.5625) per 256: ``ql[128]``, ``qh[64]``, ``scales[16]`` int8, ``d``; each half h of 128
  inputs uses ``ql[64h:64h+64]``, ``qh[32h:32h+32]``: input ``128h + 32k + l`` (k < 4, l < 32) has
  its low 4 bits in ``ql[64h + l + 32 (k & 1)]`` (the high nibble for k >= 2) and its top 2 bits in
  bits ``2k, 2k+1`` of ``qh[32h + l]``; ``value = (d * sc) * (q - 32)`` per sub-block of 16.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

QK_K = 256


class BlockType(enum.Enum):
    Q4_0 = "Q4_0"
    Q4_1 = "Q4_1"
    Q5_0 = "Q5_0"
    Q5_1 = "Q5_1"
    Q8_0 = "Q8_0"
    Q4_K = "Q4_K"
    Q5_K = "Q5_K"
    Q6_K = "Q6_K"

    @property
    def spec(self) -> _Spec:
        return _SPECS[self]

    @property
    def block(self) -> int:
        """Inputs per block."""
        return self.spec.block

    @property
    def block_bytes(self) -> int:
        return self.spec.block_bytes

    @property
    def group(self) -> int:
        """Inputs sharing one step (and zero or offset)."""
        return self.spec.group

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block

    @property
    def ggml_id(self) -> int:
        """``enum ggml_type`` (llama.cpp ``ggml.h``)."""
        return self.spec.ggml_id


@dataclass(frozen=True)
class _Spec:
    block: int
    block_bytes: int
    group: int
    bits: int
    ggml_id: int


_SPECS = {
    BlockType.Q4_0: _Spec(32, 2 + 16, 32, 4, 2),
    BlockType.Q4_1: _Spec(32, 2 + 2 + 16, 32, 4, 3),
    BlockType.Q5_0: _Spec(32, 2 + 4 + 16, 32, 5, 6),
    BlockType.Q5_1: _Spec(32, 2 + 2 + 4 + 16, 32, 5, 7),
    BlockType.Q8_0: _Spec(32, 2 + 32, 32, 8, 8),
    BlockType.Q4_K: _Spec(QK_K, 2 + 2 + 12 + 128, 32, 4, 12),
    BlockType.Q5_K: _Spec(QK_K, 2 + 2 + 12 + 32 + 128, 32, 5, 13),
    BlockType.Q6_K: _Spec(QK_K, 128 + 64 + 16 + 2, 16, 6, 14),
}
assert [t.bits_per_weight for t in BlockType] == [4.5, 5.0, 5.5, 6.0, 8.5, 4.5, 5.5, 6.5625]


@dataclass
class Grid:
    """A layer's grid ``[rows, groups]``: ``value = scale * (code - zero) - offset``; ``codes``
    ``[rows, in_features]`` uint8 are the codes the blocks held when the grid was read."""

    block_type: BlockType
    scale: np.ndarray  # float32, >= 0
    zero: np.ndarray  # float32 holding small integers
    offset: np.ndarray  # float32
    codes: np.ndarray  # uint8
    mirrored: np.ndarray  # bool [rows, groups]: code = qmax - q (a negative llama.cpp scale)

    @property
    def qmax(self) -> int:
        return (1 << self.block_type.bits) - 1

    def expand(self, field: np.ndarray) -> np.ndarray:
        """A per-group field repeated over its group's inputs: ``[rows, in_features]``."""
        return np.repeat(field, self.block_type.group, axis=1)

    def values(self, codes: np.ndarray | None = None) -> np.ndarray:
        codes = self.codes if codes is None else codes
        q = codes.astype(np.float32) - self.expand(self.zero)
        return (self.expand(self.scale) * q - self.expand(self.offset)).astype(np.float32)


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 fields (two bytes on the last axis) as float32."""
    return np.ascontiguousarray(raw).view("<f2")[..., 0].astype(np.float32)


def _blocks(data: np.ndarray, block_type: BlockType, in_features: int) -> np.ndarray:
    if data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"{block_type.value} blocks: expected uint8 [rows, bytes], got {data.dtype} {data.shape}")
    if in_features % block_type.block:
        raise ValueError(f"{block_type.value}: in_features {in_features} is not a multiple of its block of "
                         f"{block_type.block}")
    nb = in_features // block_type.block
    if data.shape[1] != nb * block_type.block_bytes:
        raise ValueError(f"{block_type.value} blocks: a row of {in_features} inputs takes {nb * block_type.block_bytes} "
                         f"bytes, got {data.shape[1]}")
    return data.reshape(data.shape[0], nb, block_type.block_bytes)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """[..., 4] bytes of a little-endian uint32 -> [..., 32] bits."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _k_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K ``scales[12]`` -> (scales, mins) [..., 8] of 6 bits each."""
    s = raw.astype(np.uint8)
    sc = np.empty(raw.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def _k_scales_bytes(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_k_scales`."""
    out = np.zeros(sc.shape[:-1] + (12,), np.uint8)
    out[..., 0:4] = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    out[..., 4:8] = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4)
    return out


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K ``qs[128]`` -> [..., 256] low 4 bits, in input order."""
    chunks = qs.reshape(qs.shape[:-1] + (4, 32))
    return np.concatenate([chunks & 0xF, chunks >> 4], axis=-1).reshape(qs.shape[:-1] + (256,))


def _k_low_nibbles_bytes(q: np.ndarray) -> np.ndarray:
    chunks = (q & 0xF).reshape(q.shape[:-1] + (4, 2, 32))
    return (chunks[..., 0, :] | (chunks[..., 1, :] << 4)).reshape(q.shape[:-1] + (128,))


def _q5k_high(qh: np.ndarray) -> np.ndarray:
    """Q5_K ``qh[32]`` -> [..., 256] bit 4 of each input."""
    bits = np.unpackbits(qh[..., None], axis=-1, bitorder="little")  # [..., 32 (l), 8 (bit 2c + half)]
    bits = np.moveaxis(bits.reshape(qh.shape[:-1] + (32, 4, 2)), -3, -1)  # [..., c, half, l]
    return bits.reshape(qh.shape[:-1] + (256,))


def _q5k_high_bytes(q: np.ndarray) -> np.ndarray:
    bits = ((q >> 4) & 1).reshape(q.shape[:-1] + (4, 2, 32))  # [..., chunk c, half, l]
    bits = np.moveaxis(bits, -1, -3).reshape(q.shape[:-1] + (32, 8))  # [..., l, 2c + half]
    return np.packbits(bits, axis=-1, bitorder="little")[..., 0]


def _q6k_codes(ql: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """Q6_K ``ql[128]``, ``qh[64]`` -> [..., 256] codes 0..63."""
    lead = ql.shape[:-1]
    ql = ql.reshape(lead + (2, 2, 32))  # half, (k & 1), l
    qh = qh.reshape(lead + (2, 1, 32))
    low = np.stack([ql[..., 0, :] & 0xF, ql[..., 1, :] & 0xF, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], axis=-2)
    high = np.concatenate([(qh >> (2 * k)) & 3 for k in range(4)], axis=-2)
    return (low | (high << 4)).reshape(lead + (256,))


def _q6k_bytes(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lead = q.shape[:-1]
    q = q.reshape(lead + (2, 4, 32))  # half, k, l
    low, high = q & 0xF, q >> 4
    ql = np.stack([low[..., 0, :] | (low[..., 2, :] << 4), low[..., 1, :] | (low[..., 3, :] << 4)], axis=-2)
    qh = high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)
    return ql.reshape(lead + (128,)).astype(np.uint8), qh.reshape(lead + (64,)).astype(np.uint8)


def _mirror(d: np.ndarray, q: np.ndarray, centre: int, qmax: int, group: int):
    """A signed step ``d`` with codes ``q`` around ``centre``, as a non-negative step: where d < 0 the
    codes become ``qmax - q`` and the zero ``qmax - centre``."""
    neg = np.signbit(d)
    scale = np.abs(d).astype(np.float32)
    zero = np.where(neg, qmax - centre, centre).astype(np.float32)
    codes = np.where(np.repeat(neg, group, axis=-1), qmax - q, q).astype(np.uint8)
    return scale, zero, codes, neg


def read_grid(block_type: BlockType, data: np.ndarray, in_features: int) -> Grid:
    """The grid and codes of a layer's blocks ``data`` uint8 ``[rows, in_features / block * block_bytes]``."""
    b = _blocks(data, block_type, in_features)
    rows, nb = b.shape[:2]
    t = block_type
    zeros = np.zeros((rows, nb * (t.block // t.group)), np.float32)
    if t in (BlockType.Q4_0, BlockType.Q5_0):
        d = _f16(b[..., 0:2])
        qs = b[..., -16:]
        q = _nibbles_32(qs)
        if t is BlockType.Q5_0:
            q = q | (_high_bits_32(b[..., 2:6]) << 4)
        centre = 8 if t is BlockType.Q4_0 else 16
        scale, zero, codes, neg = _mirror(d, q.reshape(rows, -1), centre, (1 << t.bits) - 1, 32)
        return Grid(t, scale, zero, zeros, codes, neg)
    if t in (BlockType.Q4_1, BlockType.Q5_1):
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        q = _nibbles_32(b[..., -16:])
        if t is BlockType.Q5_1:
            q = q | (_high_bits_32(b[..., 4:8]) << 4)
        return Grid(t, d, zeros, -m, q.reshape(rows, -1).astype(np.uint8), zeros.astype(bool))
    if t is BlockType.Q8_0:
        d = _f16(b[..., 0:2])
        q = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Grid(t, d, np.full_like(d, 128), zeros, q.reshape(rows, -1), zeros.astype(bool))
    if t in (BlockType.Q4_K, BlockType.Q5_K):
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _k_scales(b[..., 4:16])
        q = _k_low_nibbles(b[..., -128:])
        if t is BlockType.Q5_K:
            q = q | (_q5k_high(b[..., 16:48]) << 4)
        scale = (d[..., None] * sc.astype(np.float32)).astype(np.float32).reshape(rows, -1)
        offset = (dmin[..., None] * mn.astype(np.float32)).astype(np.float32).reshape(rows, -1)
        return Grid(t, scale, zeros, offset, q.reshape(rows, -1).astype(np.uint8), zeros.astype(bool))
    # Q6_K
    q = _q6k_codes(b[..., 0:128], b[..., 128:192])
    sc = b[..., 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[..., 208:210])
    step = (d[..., None] * sc).astype(np.float32).reshape(rows, -1)
    scale, zero, codes, neg = _mirror(step, q.reshape(rows, -1), 32, 63, 16)
    return Grid(t, scale, zero, zeros, codes, neg)


def write_codes(block_type: BlockType, data: np.ndarray, grid: Grid, codes: np.ndarray) -> np.ndarray:
    """Blocks ``data`` with their codes replaced by ``codes`` uint8 ``[rows, in_features]`` (on
    ``grid``, which :func:`read_grid` read from ``data``); scales, mins and zeros are kept as they are."""
    in_features = codes.shape[1]
    out = _blocks(data, block_type, in_features).copy()
    rows, nb = out.shape[:2]
    t = block_type
    if codes.dtype != np.uint8 or codes.shape != grid.codes.shape:
        raise ValueError(f"{t.value}: codes must be uint8 {grid.codes.shape}, got {codes.dtype} {codes.shape}")
    if int(codes.max(initial=0)) > grid.qmax:
        raise ValueError(f"{t.value}: codes must be at most {grid.qmax}, got {int(codes.max())}")
    q = np.where(grid.expand(grid.mirrored), grid.qmax - codes, codes).astype(np.uint8)
    if t in (BlockType.Q4_0, BlockType.Q4_1, BlockType.Q5_0, BlockType.Q5_1):
        q = q.reshape(rows, nb, 32)
        out[..., -16:] = (q[..., :16] & 0xF) | ((q[..., 16:] & 0xF) << 4)
        if t in (BlockType.Q5_0, BlockType.Q5_1):
            at = 2 if t is BlockType.Q5_0 else 4
            out[..., at:at + 4] = np.packbits((q >> 4) & 1, axis=-1, bitorder="little")
    elif t is BlockType.Q8_0:
        out[..., 2:] = (q.reshape(rows, nb, 32).astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    elif t in (BlockType.Q4_K, BlockType.Q5_K):
        q = q.reshape(rows, nb, 256)
        out[..., -128:] = _k_low_nibbles_bytes(q)
        if t is BlockType.Q5_K:
            out[..., 16:48] = _q5k_high_bytes(q)
    else:
        ql, qh = _q6k_bytes(q.reshape(rows, nb, 256))
        out[..., 0:128], out[..., 128:192] = ql, qh
    return out.reshape(rows, -1)


def dequantize(block_type: BlockType, data: np.ndarray, in_features: int) -> np.ndarray:
    """float32 ``[rows, in_features]``: what llama.cpp computes from these blocks."""
    grid = read_grid(block_type, data, in_features)
    return grid.values()
