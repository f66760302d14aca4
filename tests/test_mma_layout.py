"""A lane-by-lane model of the tensor-core GEMV (csrc/cuda/gemv_mma.cu), run on the CPU: which
bytes each lane loads, how it decodes them, how its registers fill the A and B fragments of
mma.m16n8k16 (the PTX ISA's fragment layouts), how warps share tiles and split K, and where each
accumulator is written. It must reproduce the exact product for every split and odd shape, so a
change of the kernel's index arithmetic can be checked here before it reaches a GPU."""
import numpy as np
import pytest
import torch

from brecq_ext import ops, reference as ref

WARPS, TILE, BLOCK_K, UNROLL = 8, 8, 64, 4


def _lane_block(packed, scale, zero, x, bits, g, row0, kb, lane, n, k):
    """What lane `lane` of the warp on tile row0 loads for K block kb (kernel: the u-loop body)."""
    gid, tig = lane // 4, lane % 4
    b_row, c_row = row0 + gid, row0 + 2 * tig
    grp = kb * BLOCK_K // g
    block_bytes, lane_bytes = BLOCK_K * bits // 8, 16 * bits // 8
    if b_row < n:
        start = tig * lane_bytes + kb * block_bytes
        word = int.from_bytes(bytes(packed[b_row, start:start + lane_bytes].tolist()), "little")
        q = [(word >> (bits * j)) & ((1 << bits) - 1) for j in range(16)]
        z = int(zero[b_row, grp])
    else:
        q, z = [0] * 16, 0
    s0 = float(scale[c_row, grp]) if c_row < n else 0.0
    s1 = float(scale[c_row + 1, grp]) if c_row + 1 < n else 0.0
    col = kb * BLOCK_K + tig * 16
    m = x.shape[0]

    def row(r):
        return [float(x[r, col + e]) if r < m and col + e < k else 0.0 for e in range(16)]

    return q, z, s0, s1, row(gid), row(gid + 8)


def _mma_block(lanes):
    """The four MMA steps of one K block from the lanes' registers; returns c[lane][4]."""
    c = np.zeros((32, 4))
    for s in range(4):
        a, b = np.zeros((16, 16)), np.zeros((16, 8))
        for lane, (q, z, _, _, xa, xb) in enumerate(lanes):
            gid, t = lane // 4, lane % 4
            for e in range(2):
                # a0 = xa[2s] (positions 4s, 4s+1), a1 = xb[2s], a2 = xa[2s+1] (4s+2, 4s+3), a3 = xb[2s+1]
                a[gid, 2 * t + e], a[gid + 8, 2 * t + e] = xa[4 * s + e], xb[4 * s + e]
                a[gid, 2 * t + 8 + e], a[gid + 8, 2 * t + 8 + e] = xa[4 * s + 2 + e], xb[4 * s + 2 + e]
                # b0 = (q[4s] - z, q[4s+1] - z), b1 = (q[4s+2] - z, q[4s+3] - z); column n = gid
                b[2 * t + e, gid], b[2 * t + 8 + e, gid] = q[4 * s + e] - z, q[4 * s + 2 + e] - z
        d = a @ b
        for lane in range(32):
            gid, t = lane // 4, lane % 4
            c[lane] += [d[gid, 2 * t], d[gid, 2 * t + 1], d[gid + 8, 2 * t], d[gid + 8, 2 * t + 1]]
    return c


def emulate(x, packed, scale, zero, n, k, bits, g, split):
    m = x.shape[0]
    k_blocks = -(-k // g) * g // BLOCK_K
    tiles_per_block = WARPS // split
    blocks = -(-(-(-n // TILE)) // tiles_per_block)
    y = np.full((m, n), np.nan)
    for block in range(blocks):
        partial = np.zeros((WARPS, 32, 4))
        for warp in range(WARPS):
            row0 = (block * tiles_per_block + warp // split) * TILE
            for kb0 in range(warp % split, k_blocks, split * UNROLL):
                for u in range(UNROLL):
                    kb = kb0 + u * split
                    if kb >= k_blocks:
                        break
                    lanes = [_lane_block(packed, scale, zero, x, bits, g, row0, kb, lane, n, k) for lane in range(32)]
                    c = _mma_block(lanes)
                    for lane, (_, _, s0, s1, _, _) in enumerate(lanes):
                        partial[warp, lane] += c[lane] * [s0, s1, s0, s1]
        for warp in range(0, WARPS, split):
            acc = partial[warp:warp + split].sum(0)
            row0 = (block * tiles_per_block + warp // split) * TILE
            for lane in range(32):
                gid, tig = lane // 4, lane % 4
                for i in range(4):
                    r, f = gid + (8 if i >= 2 else 0), row0 + 2 * tig + (i & 1)
                    if r < m and f < n:
                        y[r, f] = acc[lane, i]
    return y


@pytest.mark.parametrize("split", [1, 2, 8])
@pytest.mark.parametrize("bits,group_size,n,k", [(4, 64, 13, 172), (6, 64, 9, 300), (4, 128, 70, 256),
                                                 (6, 128, 11, 200)], ids=str)
@pytest.mark.parametrize("rows", [1, 9, 16])
def test_lane_model_of_tensor_core_gemv_is_exact(split, bits, group_size, n, k, rows):
    gen = torch.Generator().manual_seed(bits * n + rows)
    w = torch.randn(n, k, generator=gen) * 0.05
    scale, zero = ops.quant_params(w, bits, group_size)
    codes = ops.quantize(w, scale, zero, bits, group_size)
    packed = ops.pack(codes, bits, group_size)
    x = torch.randn(rows, k, generator=gen)
    expected = (x.double() @ ref.dequantize(codes, scale, zero, group_size).double().t()).numpy()
    got = emulate(x.numpy(), packed.numpy(), scale.float().numpy(), zero.numpy(), n, k, bits, group_size, split)
    assert not np.isnan(got).any(), "an output was never written"
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
