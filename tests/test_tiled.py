"""The TILE16 layout of 4- and 6-bit weights (brecq_ext.layout) and its matmul op: exact
rearrangement, kernels against the float64 product on every CPU code path, and QuantLinear holding
either layout."""
import pickle

import pytest
import torch

import brecq_ext
from brecq_ext import Layout, QuantLinear, ops, reference as ref
from brecq_ext._extension import cpu_kernels
from brecq_ext.layout import from_tile16, preferred_layout, tile16_shapes, tile16_supports, to_tile16

from conftest import available_isas
from test_matmul import DTYPE_IDS, _layer, assert_matmul_close


BITS = [4, 6, 8]
# Every (bits, group size) TILE16 holds among the sizes tested: 6 bits need multiples of 16.
BITS_GROUPS = [(bits, group) for bits in BITS for group in (8, 16, 32, 64, 128) if tile16_supports(bits, group)]
BITS_GROUPS_IDS = [f"w{bits}-g{group}" for bits, group in BITS_GROUPS]


def _tiled_layer(out_features, in_features, bits, group_size, seed):
    packed, scale, zero, bias, w_deq = _layer(out_features, in_features, bits, group_size, seed)
    return (*to_tile16(packed, scale, zero, bits, group_size, in_features), bias, w_deq)


@pytest.mark.parametrize("bits,group_size", BITS_GROUPS, ids=BITS_GROUPS_IDS)
@pytest.mark.parametrize("out_features", [1, 16, 17, 33], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("in_features", [64, 96, 172, 1000], ids=lambda k: f"k{k}")
def test_rearrangement_is_exact_and_matches_the_layout_definition(bits, group_size, out_features, in_features):
    packed, scale, zero, _, _ = _layer(out_features, in_features, bits, group_size, seed=out_features)
    tiled = to_tile16(packed, scale, zero, bits, group_size, in_features)
    code_shape, param_shape = tile16_shapes(out_features, in_features, bits, group_size)
    assert [tuple(t.shape) for t in tiled] == [code_shape, param_shape, param_shape]
    back = from_tile16(*tiled, bits, group_size, in_features, out_features)
    assert all(torch.equal(a, b) for a, b in zip(back, (packed, scale, zero)))
    # The reference reads the layout from its written definition, independently of to_tile16.
    codes, s, z = ref.tile16_codes(*tiled, bits, in_features, out_features)
    assert torch.equal(codes, ops.unpack(packed, bits, group_size, in_features))
    assert torch.equal(s, scale) and torch.equal(z, zero)
    padding = tiled[1].transpose(1, 2).reshape(-1, param_shape[1])[out_features:]
    assert not padding.float().any()  # padded rows have scale 0: they add nothing


@pytest.mark.parametrize("bits,group_size", BITS_GROUPS, ids=BITS_GROUPS_IDS)
@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 33], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("in_features", [172, 1000], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("out_features", [17, 40], ids=lambda n: f"n{n}")
def test_every_code_path_against_the_exact_product(isa, bits, group_size, dtype, rows, in_features, out_features):
    packed, scale, zero, bias, w_deq = _tiled_layer(out_features, in_features, bits, group_size,
                                                    seed=rows + out_features)
    x = torch.randn(rows, in_features).to(dtype)
    y = ops.tile16_matmul(x, packed, scale, zero, bias, bits, group_size, in_features, out_features)
    assert y.dtype == dtype and y.shape == (rows, out_features)
    assert_matmul_close(y, x.float(), w_deq, bias)
    y_ref = ref.tile16_matmul(x, packed, scale, zero, bias, bits, group_size, in_features, out_features)
    assert_matmul_close(y_ref, x.float(), w_deq, bias)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"w{b}")
@pytest.mark.parametrize("out_features", [1, 17, 1024], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("in_features", [64, 96, 172, 1000, 1024, 3072], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("rows", [1, 3, 7, 64, 511], ids=lambda m: f"m{m}")
def test_shapes_bfloat16(bits, rows, in_features, out_features):
    packed, scale, zero, bias, w_deq = _tiled_layer(out_features, in_features, bits, 64, seed=rows + in_features)
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    y = ops.tile16_matmul(x, packed, scale, zero, bias, bits, 64, in_features, out_features)
    assert y.shape == (rows, out_features) and y.dtype == torch.bfloat16
    assert_matmul_close(y, x.float(), w_deq, bias)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"w{b}")
@pytest.mark.parametrize("rows", [1, 6, 40], ids=lambda m: f"m{m}")
def test_non_contiguous_and_batched_inputs(isa, bits, rows):
    packed, scale, zero, bias, w_deq = _tiled_layer(24, 172, bits, 64, seed=3)
    x = torch.randn(172, rows).t()  # rows of x are strided
    y = ops.tile16_matmul(x, packed, scale, zero, bias, bits, 64, 172, 24)
    assert_matmul_close(y, x, w_deq, bias)
    batched = torch.randn(2, rows, 172)
    yb = ops.tile16_matmul(batched, packed, scale, zero, None, bits, 64, 172, 24)
    assert yb.shape == (2, rows, 24)
    assert_matmul_close(yb.reshape(-1, 24), batched.reshape(-1, 172), w_deq, None)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"w{b}")
def test_gradient_matches_the_row_major_op(bits):
    packed, scale, zero, bias, _ = _layer(24, 172, bits, 64, seed=5)
    tiled = to_tile16(packed, scale, zero, bits, 64, 172)
    x = torch.randn(3, 172, requires_grad=True)
    b = bias.clone().requires_grad_(True)
    ops.tile16_matmul(x, *tiled, b, bits, 64, 172, 24).square().sum().backward()
    x_rows, b_rows = x.detach().clone().requires_grad_(True), bias.clone().requires_grad_(True)
    ops.packed_matmul(x_rows, packed, scale, zero, b_rows, bits, 64, 172).square().sum().backward()
    torch.testing.assert_close(x.grad, x_rows.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, b_rows.grad, rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_argument():
    packed, scale, zero, bias, _ = _tiled_layer(17, 172, 4, 64, seed=1)
    x = torch.randn(2, 172)
    with pytest.raises(ValueError, match="packed must have shape"):
        ops.tile16_matmul(x, packed[:1], scale, zero, bias, 4, 64, 172, 17)
    with pytest.raises(ValueError, match="scale must have shape"):
        ops.tile16_matmul(x, packed, scale[:, :2], zero, bias, 4, 64, 172, 17)
    with pytest.raises(TypeError, match="zero must have dtype uint8"):
        ops.tile16_matmul(x, packed, scale, zero.int(), bias, 4, 64, 172, 17)
    with pytest.raises(ValueError, match="packed must have shape"):  # 33 outputs need 3 tiles
        ops.tile16_matmul(x, packed, scale, zero, None, 4, 64, 172, 33)
    with pytest.raises(ValueError, match=r"packed must have shape \(2, 12, 192\)"):  # 4-bit data, 6-bit layout
        ops.tile16_matmul(x, packed, scale, zero, None, 6, 64, 172, 17)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 172\]"):
        ops.tile16_matmul(torch.randn(2, 171), packed, scale, zero, bias, 4, 64, 172, 17)
    with pytest.raises(ValueError, match=r"bias must have shape \(17,\)"):
        ops.tile16_matmul(x, packed, scale, zero, bias[:3], 4, 64, 172, 17)
    with pytest.raises(ValueError, match="group_size must be a multiple of 8"):
        ops.tile16_matmul(x, packed, scale, zero, bias, 4, 60, 172, 17)
    with pytest.raises(ValueError, match="TILE16 holds 4- and 8-bit weights"):
        ops.tile16_matmul(x, packed, scale, zero, bias, 5, 64, 172, 17)
    packed6, scale6, zero6, _, _ = _layer(17, 172, 6, 8, seed=1)
    with pytest.raises(ValueError, match="6-bit weights \\(group_size a multiple of 16\\)"):
        to_tile16(packed6, scale6, zero6, 6, 8, 172)
    packed6, scale6, zero6, _, _ = _layer(17, 172, 6, 64, seed=1)
    with pytest.raises(ValueError, match="packed must have shape"):  # 6-bit rows given as 4-bit
        to_tile16(packed6, scale6, zero6, 4, 64, 172)


# -- QuantLinear in either layout -------------------------------------------------------------------
def _pair(out_features=37, in_features=1000, bias=True, bits=4):
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    torch.nn.init.normal_(linear.weight, std=0.05)
    return (QuantLinear.from_linear(linear, bits, 64, layout=Layout.TILE16),
            QuantLinear.from_linear(linear, bits, 64, layout=Layout.ROWS))


def test_default_layout_follows_the_cpu_kernels(isa):
    expected = Layout.TILE16 if isa in ("avx512", "avx512vnni", "avx2") else Layout.ROWS
    for bits in (4, 6, 8):
        assert QuantLinear(172, 17, bits, 64).layout is expected, bits
    assert QuantLinear(172, 17, 6, 8).layout is Layout.ROWS  # 6-bit TILE16 needs groups of whole step pairs
    assert QuantLinear(172, 17, 3, 64).layout is Layout.ROWS
    assert preferred_layout("meta", 4, 64) is Layout.ROWS


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"w{b}")
@pytest.mark.parametrize("rows", [1, 5, 9], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_both_layouts_compute_the_same_layer(bits, rows, dtype):
    tiled, rows_layer = _pair(bits=bits)
    assert tiled.layout is Layout.TILE16 and rows_layer.layout is Layout.ROWS
    x = torch.randn(rows, 1000).to(dtype)
    with torch.inference_mode():
        assert_matmul_close(tiled(x), x.float(), rows_layer.dequantized_weight(), rows_layer.bias)
    assert torch.equal(tiled.codes(), rows_layer.codes())
    assert torch.equal(tiled.dequantized_weight(), rows_layer.dequantized_weight())


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"w{b}")
def test_state_dict_is_row_major_in_both_layouts_and_loads_into_either(bits):
    tiled, rows_layer = _pair(bits=bits)
    saved = tiled.state_dict()
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in
                                                              rows_layer.state_dict().items()}
    assert all(torch.equal(saved[k], v) for k, v in rows_layer.state_dict().items())
    for layout in (Layout.TILE16, Layout.ROWS):
        fresh = QuantLinear(1000, 37, bits, 64, bias=True, layout=layout)
        fresh.load_state_dict(saved)
        assert fresh.layout is layout
        assert all(torch.equal(a, b) for a, b in zip(fresh.row_major_weights(), rows_layer.row_major_weights()))
    given = dict(saved)
    QuantLinear(1000, 37, bits, 64, bias=True, layout=Layout.TILE16).load_state_dict(given)
    assert given["packed"] is saved["packed"]  # the caller's dict is left as it was


def test_loading_wrong_shapes_into_the_tiled_layout_names_the_expected_ones():
    tiled, _ = _pair()
    saved = tiled.state_dict()
    saved["packed"] = saved["packed"][:, :-1]
    with pytest.raises(RuntimeError, match=r"expected the row-major shapes \[\(37, 512\)"):
        QuantLinear(1000, 37, 4, 64, bias=True, layout=Layout.TILE16).load_state_dict(saved)


def test_layout_choice_on_moves_and_explicit_requests():
    tiled, _ = _pair()
    assert tiled.to("meta").layout is Layout.ROWS  # no kernel for TILE16 off the CPU
    with pytest.raises(ValueError, match="TILE16 holds 4- and 8-bit weights"):
        QuantLinear(172, 17, 5, 64, layout=Layout.TILE16)
    with pytest.raises(ValueError, match="TILE16 is a CPU layout"):
        QuantLinear(172, 17, 4, 64, device="meta").use_layout(Layout.TILE16)
    automatic = QuantLinear(172, 17, 4, 64, device="meta")
    assert automatic.layout is Layout.ROWS
    automatic.to_empty(device="cpu")
    assert automatic.layout is preferred_layout("cpu", 4, 64)  # chosen again on the move
    pinned = QuantLinear(172, 17, 4, 64, layout=Layout.ROWS).to("cpu")
    assert pinned.layout is Layout.ROWS


def test_memory_counts_the_padding_rows_and_pickles_keep_the_layer():
    tiled, rows_layer = _pair(out_features=17, in_features=172)
    # 17 outputs take two tiles of 16 rows: 15 zero rows of codes, scales and zeros more.
    padding = 15 * (96 + 3 * 3)
    assert tiled.memory_bytes() == rows_layer.memory_bytes() + padding
    assert rows_layer.memory_bytes() == rows_layer.storage().total_bytes
    clone = pickle.loads(pickle.dumps(tiled))
    assert clone.layout is Layout.TILE16
    x = torch.randn(2, 172)
    with torch.inference_mode():
        assert torch.equal(clone(x), tiled(x))


def test_forward_uses_the_tiled_kernel_and_compiles():
    tiled, rows_layer = _pair(out_features=32, in_features=256)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    compiled = torch.compile(tiled, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_matmul_close(compiled(x), x.float(), rows_layer.dequantized_weight(), rows_layer.bias)
    assert "layout=tile16" in repr(tiled) and brecq_ext.Layout is Layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"w{b}")
def test_gemm_path_in_several_workspace_tiles(monkeypatch, bits, dtype):
    # Workspace tiles of a few rows: TILE16 ranges must start on whole tiles of 16 rows, and the
    # row-major path must stitch its tiles too.
    monkeypatch.setattr(ops.matmul, "GEMM_TILE_ELEMENTS", 20 * 172)
    packed, scale, zero, bias, w_deq = _layer(45, 172, bits, 64, seed=bits)
    x = torch.randn(33, 172).to(dtype)
    tiled = to_tile16(packed, scale, zero, bits, 64, 172)
    assert_matmul_close(ops.tile16_matmul(x, *tiled, bias, bits, 64, 172, 45), x.float(), w_deq, bias)
    assert_matmul_close(ops.packed_matmul(x, packed, scale, zero, bias, bits, 64, 172), x.float(), w_deq, bias)


# ---- the AVX-512 4- and 8-bit kernels' integer activations (reference.digit_rounded_activations) ----

def _tiled_gemv_float32_out(x_bf16, packed, scale, zero, bits, group_size, in_features, out_features):
    """The compiled TILE16 GEMV with a float32 output, which a bfloat16 op result would round away."""
    y = torch.empty(x_bf16.shape[0], out_features)
    cpu_kernels().tiled_gemv(x_bf16.data_ptr(), True, x_bf16.shape[0], in_features, packed.data_ptr(),
                             scale.data_ptr(), zero.data_ptr(), 0, out_features, in_features, bits, group_size,
                             y.data_ptr(), False, torch.get_num_threads())
    return y


def _wide_range_rows(rows, in_features, group_size, seed):
    """bfloat16 rows whose groups each hold one input of magnitude 2^7 among inputs near 2^-6: the
    quantum 2^(8 - 14) of such a group rounds the small ones coarsely."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen) * 2.0 ** -6
    x[:, ::group_size] = 128.0 * torch.sign(torch.randn(rows, (in_features + group_size - 1) // group_size,
                                                        generator=gen))
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("bits,group_size", [(4, 8), (4, 64), (4, 128), (6, 16), (6, 64), (6, 1024), (8, 8), (8, 64),
                                              (8, 256), (4, 8192), (6, 2048), (8, 512)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("rows", [1, 5, 8], ids=lambda m: f"m{m}")
def test_integer_kernels_round_bfloat16_activations_as_documented(isa, bits, group_size, rows):
    """The integer-activation kernels (AVX-512 and AVX2, 4, 6 and 8 bits) multiply bfloat16
    activations rounded as reference.digit_rounded_activations says, groups too large for int32
    sums excepted (those keep floats, and the model says so)."""
    if isa not in ("avx512", "avx512vnni", "avx2"):
        pytest.skip(f"no integer-activation kernels on {isa}")
    in_features, out_features = 1000, 40
    packed, scale, zero, _, w_deq = _layer(out_features, in_features, bits, group_size, seed=rows)
    tiled = to_tile16(packed, scale, zero, bits, group_size, in_features)
    x = _wide_range_rows(rows, in_features, group_size, seed=rows)
    y = _tiled_gemv_float32_out(x, *tiled, bits, group_size, in_features, out_features).double()

    rounded = ref.digit_rounded_activations(x, group_size, bits).double()
    modelled, exact = rounded @ w_deq.double().t(), x.double() @ w_deq.double().t()
    # float32 sums: the kernel adds s q x and s z x separately, then subtracts; 4 units of 2^-24 of
    # their magnitudes (measured: at most 1.1 units here). The float kernels, which groups too large
    # for int32 sums keep, add offset * s x to both (a bfloat16 code holds 128 + q; 2176 at 8 bits,
    # docs/CPU.md) and sum a whole 1000-input group in float32 (measured: up to 16 units).
    keeps_floats = group_size > ref.DIGIT_MAX_GROUP[bits]
    offset = (2176 if bits == 8 else 128) if keeps_floats else 0
    s_z = (scale.double() * (zero.double() + offset)).repeat_interleave(group_size, 1)[:, :in_features]
    units = 64 if keeps_floats else 4
    float32_bound = units * 2.0 ** -24 * (x.double().abs() @ (w_deq.double().abs() + 2 * s_z).t())
    assert ((y - modelled).abs() <= float32_bound).all()
    if keeps_floats:
        assert torch.equal(rounded, x.double())
        return
    assert ((modelled - exact).abs() > 10 * float32_bound).any()  # the case does round, visibly
    # The documented bound: each input off by at most half its group's quantum 2^(8 - 14).
    assert ((y - exact).abs() <= w_deq.double().abs().sum(1) * 2.0 ** -7 + float32_bound).all()


@pytest.mark.parametrize("bits,group_size", [(4, 8), (4, 24), (4, 64), (4, 4096), (6, 16), (6, 48), (6, 64),
                                              (6, 1024), (8, 8), (8, 24), (8, 64), (8, 256)], ids=lambda v: str(v))
@pytest.mark.parametrize("sign", [-1, 1], ids=["negative", "positive"])
def test_integer_sums_at_the_largest_codes_and_digits(isa, bits, group_size, sign):
    """Every code at its largest value against activations whose digits are the largest the format
    makes (|high| 63, |low| 128, all of one sign): the partial sums the kernels keep in int16 (AVX2)
    or int32 reach their bounds and must not saturate or wrap. Exact: the products are integers
    times powers of two, well inside float32."""
    in_features, out_features, qmax = 2 * group_size + 8 * (group_size > 8), 24, (1 << bits) - 1
    codes = torch.full((out_features, in_features), qmax, dtype=torch.uint8)
    groups = -(-in_features // group_size)
    scale = torch.full((out_features, groups), 0.5, dtype=torch.float16)
    zero = torch.zeros(out_features, groups, dtype=torch.uint8)
    packed = ops.pack(codes, bits, group_size)
    tiled = to_tile16(packed, scale, zero, bits, group_size, in_features)
    # -127 * 2^-7 in a group whose largest magnitude is below 1: m = -16256 = 256 * -63 - 128.
    x = torch.full((3, in_features), sign * 127 * 2.0 ** -7).to(torch.bfloat16)
    y = _tiled_gemv_float32_out(x, *tiled, bits, group_size, in_features, out_features).double()
    expected = x.double() @ (codes.double() * 0.5).t()
    assert torch.equal(y, expected)


@pytest.mark.parametrize("bits,group_size", [(4, 8), (4, 64), (4, 128), (6, 16), (6, 64), (6, 128), (8, 8), (8, 64),
                                              (8, 256)], ids=lambda v: str(v))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9], ids=lambda m: f"m{m}")
def test_avx2_and_avx512_integer_kernels_agree_exactly(bits, group_size, rows):
    """The ISAs' integer kernels read the same digits and add them exactly, then do the same float32
    arithmetic per output: their results are equal bit for bit (where this CPU runs AVX-512; with and
    without its BF16 instructions, which the integer kernels do not use)."""
    tiers = [isa for isa in available_isas() if isa.startswith("avx512")]
    if not tiers:
        pytest.skip("needs a CPU that runs the AVX-512 kernels")
    in_features, out_features = 1000, 40  # a part-filled last tile, and groups cut by the padding
    packed, scale, zero, _, _ = _layer(out_features, in_features, bits, group_size, seed=rows)
    tiled = to_tile16(packed, scale, zero, bits, group_size, in_features)
    x = _wide_range_rows(rows, in_features, group_size, seed=rows)
    previous, results = brecq_ext.cpu_isa(), {}
    try:
        for isa in (*tiers, "avx2"):
            brecq_ext.set_cpu_isa(isa)
            results[isa] = _tiled_gemv_float32_out(x, *tiled, bits, group_size, in_features, out_features)
    finally:
        brecq_ext.set_cpu_isa(previous)
    assert torch.isfinite(results["avx2"]).all()
    for tier in tiers:
        assert torch.equal(results["avx2"], results[tier]), tier


@pytest.mark.parametrize("bits", [4, 6, 8], ids=lambda b: f"w{b}")
def test_non_finite_and_extreme_activations_keep_floats(isa, bits):
    """A call with Inf or NaN, or a group magnitude outside 2^+-100, runs the float kernel: other
    rows stay exact, the row carries the non-finite value, and the model says the same."""
    in_features, out_features, group_size = 200, 24, 64
    packed, scale, zero, bias, w_deq = _tiled_layer(out_features, in_features, bits, group_size, seed=3)
    base = torch.randn(3, in_features)
    base[1, 64:128] = 0.0  # an all-zero group beside nonzero ones
    for name, row, value in [("inf", 0, float("inf")), ("nan", 2, float("nan")), ("tiny", 0, 1e-33), ("huge", 1, 1e33)]:
        x = base.clone()
        if name in ("tiny", "huge"):
            x[row] = x[row].sign() * value
        else:
            x[row, 70] = value
        x = x.to(torch.bfloat16)
        y = ops.tile16_matmul(x, packed, scale, zero, bias, bits, group_size, in_features, out_features)
        others = [r for r in range(3) if r != row]
        assert_matmul_close(y[others], x[others].float(), w_deq, bias)
        if name in ("inf", "nan"):
            assert not torch.isfinite(y[row]).any(), name
        else:
            assert_matmul_close(y[row:row + 1], x[row:row + 1].float(), w_deq, bias)
        torch.testing.assert_close(ref.digit_rounded_activations(x, group_size, bits), x.float(), rtol=0, atol=0,
                                   equal_nan=True, msg=name)


# ---- several products of one input in one loop (the C++ decoder's q/k/v and gate/up) ----------

def _batch_calls(members, layers, x, x_bf16, rows, in_features, widths, keep_bias):
    """tiled_gemv_batch's calls for ``members`` ((bits, group, _) each) on ``layers``, with outputs
    [rows, widths[i]] filled with NaN, and what tiled_gemv gives for each call alone. ``keep_bias(bits)``:
    whether that call passes its bias."""
    calls, outputs, alone = [], [], []
    for (bits, group, _), n, (packed, scale, zero, bias, _) in zip(members, widths, layers):
        bias = bias.float() if bias is not None and keep_bias(bits) else None
        y = torch.full((rows, n), float("nan"))
        calls.append((packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), bias.data_ptr() if bias is not None else 0,
                      n, bits, group, y.data_ptr()))
        outputs.append(y)
        expected = torch.empty(rows, n)
        cpu_kernels().tiled_gemv(x.data_ptr(), x_bf16, rows, in_features, packed.data_ptr(), scale.data_ptr(),
                                 zero.data_ptr(), bias.data_ptr() if bias is not None else 0, n, in_features, bits,
                                 group, expected.data_ptr(), False, torch.get_num_threads())
        alone.append(expected)
    return calls, outputs, alone


@pytest.mark.parametrize("members", [((6, 64, 40), (6, 64, 17), (6, 64, 17)), ((4, 64, 48), (4, 64, 48)),
                                     ((4, 32, 17), (6, 64, 33), (8, 64, 16), (4, 128, 1)),
                                     ((6, 64, 40), (4, 64, 17), (6, 64, 23), (4, 32, 9))],
                         ids=["qkv-w6", "gate-up-w4", "mixed-w4-w6-w8", "shared-input-not-adjacent"])
@pytest.mark.parametrize("x_bf16", [True, False], ids=["bf16", "f32"])
@pytest.mark.parametrize("rows", [1, 3, 8], ids=lambda m: f"m{m}")
def test_batch_of_products_equals_each_product_alone(isa, members, x_bf16, rows):
    """tiled_gemv_batch runs its calls' tiles as one loop: each output is exactly what tiled_gemv
    gives for that call on its own, on every code path, with and without bias."""
    in_features = 1000
    layers = [_tiled_layer(n, in_features, bits, group, seed=i + rows) for i, (bits, group, n) in enumerate(members)]
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    x = x.to(torch.bfloat16) if x_bf16 else x
    calls, outputs, alone = _batch_calls(members, layers, x, x_bf16, rows, in_features, [n for *_, n in members],
                                         keep_bias=lambda bits: bits != 8)  # one call without bias
    cpu_kernels().tiled_gemv_batch(x.data_ptr(), x_bf16, rows, in_features, calls, torch.get_num_threads())
    for y, expected in zip(outputs, alone):
        assert torch.isfinite(expected).all()
        assert torch.equal(y, expected)


@pytest.mark.parametrize("members", [((4, 64, 48), (4, 64, 48)), ((4, 64, 40), (6, 64, 40)),
                                     ((6, 64, 17), (4, 32, 17), (8, 64, 17))],
                         ids=["gate-up-w4", "w4-w6-tail-8", "three-one-partial-tile"])
@pytest.mark.parametrize("x_bf16", [True, False], ids=["bf16", "f32"])
@pytest.mark.parametrize("rows", [1, 3, 8], ids=lambda m: f"m{m}")
def test_batch_tile_epilogue_sees_each_tile_final_and_once(isa, members, x_bf16, rows):
    """With a tile epilogue (the decoder's SiLU x up), the batch takes tile t of every call, then the
    epilogue on its columns: each column range comes once, ranges tile [0, n) in 16-row tiles, every
    output the epilogue copies is already final, and the outputs are those of each call alone."""
    in_features = 1000
    n = members[0][2]
    layers = [_tiled_layer(n, in_features, bits, group, seed=3 * i + rows) for i, (bits, group, _) in enumerate(members)]
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    x = x.to(torch.bfloat16) if x_bf16 else x
    calls, outputs, alone = _batch_calls(members, layers, x, x_bf16, rows, in_features, [n] * len(members),
                                         keep_bias=lambda bits: True)
    snapshot = torch.full((len(members), rows, n), float("nan"))
    ranges = cpu_kernels().tiled_gemv_batch(x.data_ptr(), x_bf16, rows, in_features, calls, torch.get_num_threads(),
                                            snapshot=snapshot.data_ptr())
    assert sorted(ranges) == [(t * 16, min(n, t * 16 + 16)) for t in range((n + 15) // 16)]
    for i, (y, expected) in enumerate(zip(outputs, alone)):
        assert torch.isfinite(expected).all()
        assert torch.equal(y, expected)
        assert torch.equal(snapshot[i], expected)


def test_batch_tile_epilogue_needs_calls_of_one_width():
    x = torch.zeros(1, 64)
    layers = [_tiled_layer(n, 64, 4, 64, seed=n) for n in (32, 48)]
    ys = [torch.empty(1, n) for n in (32, 48)]
    calls = [(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), 0, y.shape[1], 4, 64, y.data_ptr())
             for (packed, scale, zero, _, _), y in zip(layers, ys)]
    snapshot = torch.empty(2, 1, 48)
    with pytest.raises(ValueError, match="every call needs the same n; call 0 has 32, call 1 has 48"):
        cpu_kernels().tiled_gemv_batch(x.data_ptr(), False, 1, 64, calls, 1, snapshot=snapshot.data_ptr())


def test_batch_of_products_refuses_a_count_it_cannot_hold():
    x = torch.zeros(1, 64)
    with pytest.raises(ValueError, match="count must be 1-4, got 0"):
        cpu_kernels().tiled_gemv_batch(x.data_ptr(), False, 1, 64, [], 1)
    packed, scale, zero, _, _ = _tiled_layer(16, 64, 4, 64, seed=0)
    y = torch.empty(1, 16)
    call = (packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), 0, 16, 4, 64, y.data_ptr())
    with pytest.raises(ValueError, match="count must be 1-4, got 5"):
        cpu_kernels().tiled_gemv_batch(x.data_ptr(), False, 1, 64, [call] * 5, 1)
