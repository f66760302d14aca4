import pytest
import torch

from brecq_ext import ops, reference as ref
from brecq_ext._extension import cpu_kernels
from brecq_ext.layout import tile16_supports, to_tile16
from brecq_ext.format import packed_row_bytes, padded_in_features

BITS = [2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"w{b}")
@pytest.mark.parametrize("group_size", [8, 32, 64, 128], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("rows,in_features", [(1, 1), (1, 64), (3, 96), (7, 172), (2, 1000), (1, 3072)],
                         ids=lambda v: str(v))
def test_pack_round_trip_is_exact_and_matches_reference(bits, group_size, rows, in_features, device):
    gen = torch.Generator().manual_seed(bits * 1000 + in_features)
    codes = torch.randint(0, 1 << bits, (rows, in_features), dtype=torch.uint8, generator=gen).to(device)
    packed = ops.pack(codes, bits, group_size)
    assert packed.shape == (rows, packed_row_bytes(in_features, group_size, bits))
    assert torch.equal(packed.cpu(), ref.pack(codes.cpu(), bits, group_size))
    assert torch.equal(ops.unpack(packed, bits, group_size, in_features), codes)
    # Padded positions hold code 0.
    padded = padded_in_features(in_features, group_size)
    assert not ops.unpack(packed, bits, group_size, padded)[:, in_features:].any()


def test_four_bit_nibble_order():
    codes = torch.tensor([[0x1, 0x2, 0xF, 0x0] + [0] * 4], dtype=torch.uint8)
    packed = ops.pack(codes, 4, 8)
    assert packed[0, :2].tolist() == [0x21, 0x0F]


def test_six_bit_little_endian_24_bit_units():
    codes = torch.tensor([[1, 2, 3, 4, 63, 0, 0, 63]], dtype=torch.uint8)
    packed = ops.pack(codes, 6, 8)
    word0 = 1 | 2 << 6 | 3 << 12 | 4 << 18
    word1 = 63 | 0 << 6 | 0 << 12 | 63 << 18
    expected = [word0 & 0xFF, word0 >> 8 & 0xFF, word0 >> 16, word1 & 0xFF, word1 >> 8 & 0xFF, word1 >> 16]
    assert packed[0].tolist() == expected


def test_pack_rejects_codes_above_the_bit_width():
    codes = torch.tensor([[0, 16, 3, 1, 0, 0, 0, 0]], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\].*1 codes"):
        ops.pack(codes, 4, 8)


def test_unpack_rejects_packed_tensor_of_the_wrong_size():
    packed = torch.zeros(4, 95, dtype=torch.uint8)  # 172 inputs at W4 g64 need 96 bytes a row
    with pytest.raises(ValueError, match=r"packed must have shape \(4, 96\)"):
        ops.unpack(packed, 4, 64, 172)


@pytest.mark.parametrize("bad_group", [0, -64, 12], ids=["zero", "negative", "not-multiple-of-8"])
def test_pack_rejects_bad_group_size(bad_group):
    with pytest.raises(ValueError, match="group_size"):
        ops.pack(torch.zeros(2, 64, dtype=torch.uint8), 4, bad_group)


@pytest.mark.parametrize("bad_bits", [1, 9, 0])
def test_pack_rejects_bits_out_of_range(bad_bits):
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 8\]"):
        ops.pack(torch.zeros(2, 64, dtype=torch.uint8), bad_bits, 64)


def test_pack_rejects_wrong_dtype():
    with pytest.raises(TypeError, match="codes must have dtype uint8, got int32"):
        ops.pack(torch.zeros(2, 64, dtype=torch.int32), 4, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"w{b}")
@pytest.mark.parametrize("group_size", [8, 32, 64, 128], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("rows,in_features", [(1, 1), (3, 96), (7, 172), (2, 1000), (5, 1024)], ids=lambda v: str(v))
def test_dequantize_packed_equals_reference_bit_for_bit(isa, dtype, bits, group_size, rows, in_features):
    # The GEMM path's workspace: every CPU code path must give the reference's values exactly,
    # tails of rows (in_features not a multiple of the group or of 32) included.
    gen = torch.Generator().manual_seed(bits * 7 + in_features)
    w = torch.randn(rows, in_features, generator=gen) * 0.05
    scale, zero = ops.quant_params(w, bits, group_size)
    packed = ops.pack(ops.quantize(w, scale, zero, bits, group_size), bits, group_size)
    got = ops.dequantize_packed(packed, scale, zero, bits, group_size, in_features, dtype)
    expected = ref.dequantize_packed(packed, scale, zero, bits, group_size, in_features, dtype)
    assert got.dtype == dtype and torch.equal(got, expected)


@pytest.mark.parametrize("bits", [2, 4, 6, 8], ids=lambda b: f"w{b}")
def test_dequantize_to_bfloat16_rounds_ties_to_even_and_keeps_nan_and_inf(isa, bits):
    # Every code path's bfloat16 store (VCVTNEPS2BF16 on AVX-512 with BF16, integer steps on
    # avx512vnni, the portable loop) against torch's rounding, on values that sit exactly between two
    # bfloat16 numbers (one rounds down to even, one up), and on Inf and NaN scales.
    scales = [1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), float("inf"), float("nan"), 2 ** -14, 65504.0]
    in_features, group_size = 64 * len(scales), 64
    codes = torch.ones(3, in_features, dtype=torch.uint8)
    scale = torch.tensor([scales] * 3, dtype=torch.float16)
    zero = torch.zeros(3, len(scales), dtype=torch.uint8)
    packed = ops.pack(codes, bits, group_size)
    expected = ref.dequantize_packed(packed, scale, zero, bits, group_size, in_features, torch.bfloat16)
    assert expected[0, 0].item() == 1.0 and expected[0, 64].item() == 1 + 2 ** -6  # the ties went both ways
    results = {"rows": ops.dequantize_packed(packed, scale, zero, bits, group_size, in_features, torch.bfloat16)}
    if tile16_supports(bits, group_size):  # the TILE16 layout's dequantization (the GEMM path of TILE16 layers)
        tiled = to_tile16(packed, scale, zero, bits, group_size, in_features)
        out = torch.empty(3, in_features, dtype=torch.bfloat16)
        cpu_kernels().dequantize_tiled(*(t.data_ptr() for t in tiled), 3, in_features, bits, group_size,
                                       out.data_ptr(), True, 1)
        results["tile16"] = out
    nan = torch.isnan(expected)
    for layout, got in results.items():
        assert torch.equal(torch.isnan(got), nan), layout
        assert torch.equal(got[~nan], expected[~nan]), layout
