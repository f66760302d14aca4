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


# --- csrc/cuda/gemv_mma16.cu: the weights as the A operand, 16 features per MMA ---------------------

MMA16_ROUND = {4: 6, 6: 4}
MAGIC = {"bf16": 0x4300, "f16": 0x6400}


def _halves_as_float(word, kind):
    """The two 16-bit floats of a 32-bit register, low half first."""
    halves = np.array([word & 0xFFFF, word >> 16], dtype=np.uint16)
    if kind == "f16":
        return halves.view(np.float16).astype(np.float64)
    return (halves.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _code_pair(run, bits, j):
    """code_pair<Bits, J>: codes j and j + 4 of a lane's run as two 16-bit fields (the run as one
    little-endian integer of 8 or 12 bytes)."""
    if bits == 4:
        word = (run >> (32 * (j // 8))) & 0xFFFFFFFF
        return (word >> (4 * (j % 8))) & 0x000F000F
    mask = (1 << bits) - 1
    return ((run >> (bits * j)) & mask) | (((run >> (bits * (j + 4))) & mask) << 16)


def _weight_pair(run, bits, j, z, kind):
    """weight_pair: (pair | magic) - (magic + zero) in both halves, as the GPU's packed subtraction
    computes it (exact, so float64 here is the same number)."""
    magic = MAGIC[kind]
    a = _halves_as_float(_code_pair(run, bits, j) | (magic * 0x00010001), kind)
    b = _halves_as_float(((magic + z) * 0x00010001) & 0xFFFFFFFF, kind)
    return a - b


def _byte_perm(x, y, select):
    source = x | (y << 32)
    return sum(((source >> (8 * ((select >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def _activation_words(x, token, col, k):
    """load_activations: 16 consecutive bfloat16 bit patterns from col as 8 words, zero beyond k or
    when the token does not exist."""
    m = x.shape[0]
    halves = [int(x[token, col + e]) if token < m and col + e < k else 0 for e in range(16)]
    return [halves[2 * i] | (halves[2 * i + 1] << 16) for i in range(8)]


def _mma16_block(runs_lo, runs_hi, zeros_lo, zeros_hi, words, bits, kind):
    """block_mma: the four m16n8k16 steps of one K block for one group of 8 tokens; c[lane][4]."""
    c = np.zeros((32, 4))
    for s in range(4):
        a, b = np.zeros((16, 16)), np.zeros((16, 8))
        for lane in range(32):
            gid, t = lane // 4, lane % 4
            regs = [_weight_pair(runs_lo[lane], bits, s, zeros_lo[lane], kind),
                    _weight_pair(runs_hi[lane], bits, s, zeros_hi[lane], kind),
                    _weight_pair(runs_lo[lane], bits, 8 + s, zeros_lo[lane], kind),
                    _weight_pair(runs_hi[lane], bits, 8 + s, zeros_hi[lane], kind)]
            # A fragment (row-major 16x16): a0 rows g / cols 2t,2t+1; a1 row g+8; a2 cols +8; a3 both.
            for e in range(2):
                a[gid, 2 * t + e], a[gid + 8, 2 * t + e] = regs[0][e], regs[1][e]
                a[gid, 2 * t + 8 + e], a[gid + 8, 2 * t + 8 + e] = regs[2][e], regs[3][e]
            select = 0x7632 if s & 1 else 0x5410
            w = words[lane]
            b0 = _halves_as_float(_byte_perm(w[s // 2], w[s // 2 + 2], select), kind)
            b1 = _halves_as_float(_byte_perm(w[4 + s // 2], w[6 + s // 2], select), kind)
            # B fragment (col-major 16x8): b0 rows 2t,2t+1 / column g; b1 rows 2t+8, 2t+9.
            for e in range(2):
                b[2 * t + e, gid], b[2 * t + 8 + e, gid] = b0[e], b1[e]
        d = a @ b
        for lane in range(32):
            gid, t = lane // 4, lane % 4
            c[lane] += [d[gid, 2 * t], d[gid, 2 * t + 1], d[gid + 8, 2 * t], d[gid + 8, 2 * t + 1]]
    return c



def emulate_mma16(x_bits, packed, scale, zero, n, k, bits, g, split, kind):
    """gemv_mma16_kernel, block by block, warp by warp; x_bits are the activations' 16-bit patterns."""
    m = x_bits.shape[0]
    high = m > 8
    acc_count = 8 if high else 4
    k_blocks = -(-k // g) * g // BLOCK_K
    tiles_per_block = WARPS // split
    blocks = -(-(-(-n // 16)) // tiles_per_block)
    lane_bytes, block_bytes, rounds = 16 * bits // 8, BLOCK_K * bits // 8, MMA16_ROUND[bits]
    y = np.full((m, n), np.nan)
    for block in range(blocks):
        partial = np.zeros((WARPS, 32, acc_count))
        for warp in range(WARPS):
            row0 = (block * tiles_per_block + warp // split) * 16
            for kb0 in range(warp % split, k_blocks, split * rounds):
                for u in range(rounds):
                    kb = kb0 + u * split
                    if kb >= k_blocks:
                        break
                    grp = kb * BLOCK_K // g
                    runs, zs, scs = {}, {}, {}
                    for half, offset in (("lo", 0), ("hi", 8)):
                        runs[half], zs[half], scs[half] = [], [], []
                        for lane in range(32):
                            row = row0 + lane // 4 + offset
                            if row < n:
                                start = (lane % 4) * lane_bytes + kb * block_bytes
                                runs[half].append(int.from_bytes(bytes(packed[row, start:start + lane_bytes].tolist()),
                                                                 "little"))
                                zs[half].append(int(zero[row, grp]))
                                scs[half].append(float(scale[row, grp]))
                            else:
                                runs[half].append(0)
                                zs[half].append(0)
                                scs[half].append(0.0)
                    for token_group in range(2 if high else 1):
                        words = [_activation_words(x_bits, lane // 4 + 8 * token_group,
                                                   kb * BLOCK_K + (lane % 4) * 16, k) for lane in range(32)]
                        c = _mma16_block(runs["lo"], runs["hi"], zs["lo"], zs["hi"], words, bits, kind)
                        for lane in range(32):
                            s_lo, s_hi = scs["lo"][lane], scs["hi"][lane]
                            partial[warp, lane, 4 * token_group:4 * token_group + 4] += c[lane] * [s_lo, s_lo, s_hi, s_hi]
        for warp in range(0, WARPS, split):
            acc = partial[warp:warp + split].sum(0)
            row0 = (block * tiles_per_block + warp // split) * 16
            for lane in range(32):
                gid, tig = lane // 4, lane % 4
                for i in range(acc_count):
                    token = 2 * tig + (i & 1) + (8 if i >= 4 else 0)
                    feature = row0 + gid + (8 if i & 2 else 0)
                    if token < m and feature < n:
                        y[token, feature] = acc[lane, i]
    return y


@pytest.mark.parametrize("kind", ["bf16", "f16"])
@pytest.mark.parametrize("split", [1, 2, 8])
@pytest.mark.parametrize("bits,group_size,n,k", [(4, 64, 13, 172), (6, 64, 19, 300), (4, 128, 40, 256),
                                                 (6, 128, 11, 200), (4, 64, 16, 1000)], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 9, 16])
def test_lane_model_of_mma16_gemv_is_exact(kind, split, bits, group_size, n, k, rows):
    gen = torch.Generator().manual_seed(bits * n + rows + split)
    w = torch.randn(n, k, generator=gen) * 0.05
    scale, zero = ops.quant_params(w, bits, group_size)
    codes = ops.quantize(w, scale, zero, bits, group_size)
    packed = ops.pack(codes, bits, group_size)
    dtype = torch.bfloat16 if kind == "bf16" else torch.float16
    x = torch.randn(rows, k, generator=gen).to(dtype)
    expected = (x.double() @ ref.dequantize(codes, scale, zero, group_size).double().t()).numpy()
    x_bits = x.view(torch.int16).numpy().astype(np.int64) & 0xFFFF
    got = emulate_mma16(x_bits, packed.numpy(), scale.float().numpy(), zero.numpy(), n, k, bits, group_size, split,
                        kind)
    assert not np.isnan(got).any(), "an output was never written"
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
