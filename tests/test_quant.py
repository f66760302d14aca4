import pytest
import torch

from brecq_ext import ops, reference as ref

SHAPES = [(1, 64), (17, 96), (3, 172), (17, 1000), (2, 3072)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(rows, cols, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=gen) * 0.05).to(dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8], ids=lambda b: f"w{b}")
@pytest.mark.parametrize("group_size", [32, 64, 128], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_minmax_params_match_reference_bit_for_bit(bits, group_size, shape, device):
    w = _weight(*shape, seed=bits + shape[1]).to(device)
    scale, zero = ops.quant_params(w, bits, group_size, 0)
    scale_ref, zero_ref = ref.quant_params(w.cpu(), bits, group_size, 0)
    assert scale.dtype == torch.float16 and zero.dtype == torch.uint8
    assert torch.equal(scale.cpu(), scale_ref) and torch.equal(zero.cpu(), zero_ref)
    # The range is covered: no weight is clipped by more than half a step.
    err = (ops.fake_quantize(w, scale, zero, bits, group_size) - w).abs()
    half_step = ref._expand(scale.float(), group_size, shape[1]).to(device) / 2
    assert bool((err <= half_step * (1 + 1e-3)).all())


def _group_errors(w, scale, zero, bits, group_size):
    err = (ref.fake_quantize(w, scale, zero, bits, group_size) - w).double().square()
    return ref._grouped(err, group_size).sum(-1)


@pytest.mark.parametrize("bits", [3, 4, 6], ids=lambda b: f"w{b}")
@pytest.mark.parametrize("group_size", [32, 64, 128], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_mse_search_matches_reference_and_beats_minmax(bits, group_size, shape, device):
    w = _weight(*shape, seed=7 * bits + shape[0])
    scale, zero = (t.cpu() for t in ops.quant_params(w.to(device), bits, group_size, 80))
    scale_ref, zero_ref = ref.quant_params(w, bits, group_size, 80)
    err = _group_errors(w, scale, zero, bits, group_size)
    err_ref = _group_errors(w, scale_ref, zero_ref, bits, group_size)
    err_minmax = _group_errors(w, *ops.quant_params(w, bits, group_size, 0), bits, group_size)
    # Kernel and reference sum the squared errors in different orders, so a near-tie may pick a
    # different factor; the error they reach must agree to rounding.
    assert torch.allclose(err, err_ref, rtol=1e-5, atol=1e-12)
    same = (scale == scale_ref) & (zero == zero_ref)
    assert same.float().mean().item() >= 0.98
    assert bool((err <= err_minmax * (1 + 1e-6)).all())
    if bits <= 4:  # at low bit widths clipping the tails of a Gaussian always pays
        assert err.sum() < err_minmax.sum()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("bits", [2, 4, 6, 8], ids=lambda b: f"w{b}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_quantize_dequantize_fake_quantize_match_reference(dtype, bits, shape, device):
    group_size = 64
    w = _weight(*shape, seed=bits, dtype=dtype).to(device)
    scale, zero = ops.quant_params(w, bits, group_size, 0)
    codes = ops.quantize(w, scale, zero, bits, group_size)
    assert torch.equal(codes.cpu(), ref.quantize(w.cpu(), scale.cpu(), zero.cpu(), bits, group_size))
    assert int(codes.max()) <= (1 << bits) - 1
    deq = ops.dequantize(codes, scale, zero, group_size)
    assert deq.dtype == torch.float32
    assert torch.equal(deq.cpu(), ref.dequantize(codes.cpu(), scale.cpu(), zero.cpu(), group_size))
    fq = ops.fake_quantize(w, scale, zero, bits, group_size)
    assert fq.dtype == dtype
    assert torch.equal(fq.cpu(), ref.fake_quantize(w.cpu(), scale.cpu(), zero.cpu(), bits, group_size))


def test_quantize_non_contiguous_weight():
    w = _weight(96, 40, seed=3).t()  # [40, 96], column-major
    scale, zero = ops.quant_params(w, 4, 32)
    assert torch.equal(ops.quantize(w, scale, zero, 4, 32), ref.quantize(w.contiguous(), scale, zero, 4, 32))


def test_all_zero_group_dequantizes_to_exact_zero():
    w = torch.zeros(2, 128)
    w[1, 64:] = torch.linspace(-1, 1, 64)
    scale, zero = ops.quant_params(w, 4, 64)
    fq = ops.fake_quantize(w, scale, zero, 4, 64)
    assert torch.equal(fq[0], torch.zeros(128)) and torch.equal(fq[1, :64], torch.zeros(64))


def test_fake_quantize_gradient_is_straight_through_except_where_clipped():
    w = torch.linspace(-1, 1, 64).reshape(1, 64)
    # Parameters fitted to half the range: the outer weights are clipped.
    scale, zero = ops.quant_params(w * 0.5, 4, 64)
    w = w.clone().requires_grad_(True)
    ops.fake_quantize(w, scale, zero, 4, 64).sum().backward()
    expected = ref.fake_quantize_mask(w.detach(), scale, zero, 4, 64).float()
    assert torch.equal(w.grad, expected)
    assert 0 < expected.sum() < 64


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_params_refuse_non_finite_weights(bad):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    with pytest.raises(ValueError, match=r"weight contains NaN or Inf \(first at index \(2, 5\)\)"):
        ops.quant_params(w, 4, 64)


@pytest.mark.parametrize("bits", [1, 9, -4])
def test_params_refuse_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=r"brecq.quant_params: bits must be an integer in \[2, 8\]"):
        ops.quant_params(torch.randn(4, 64), bits, 64)


@pytest.mark.parametrize("group_size", [0, -32])
def test_params_refuse_non_positive_group_size(group_size):
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        ops.quant_params(torch.randn(4, 64), 4, group_size)


def test_params_refuse_integer_weight():
    with pytest.raises(TypeError, match="weight must have dtype float32 or bfloat16 or float16, got int64"):
        ops.quant_params(torch.ones(4, 64, dtype=torch.int64), 4, 64)


def test_params_refuse_1d_weight():
    with pytest.raises(ValueError, match=r"weight must be 2-D, got shape \(64,\)"):
        ops.quant_params(torch.randn(64), 4, 64)


def test_quantize_refuses_mismatched_scale():
    w = torch.randn(4, 100)
    scale, zero = ops.quant_params(w, 4, 64)
    with pytest.raises(ValueError, match=r"scale must have shape \(4, 4\)"):
        ops.quantize(w, scale, zero, 4, 32)
    with pytest.raises(TypeError, match="scale must have dtype float16, got float32"):
        ops.quantize(w, scale.float(), zero, 4, 64)


def test_scales_beyond_float16_are_refused_with_the_place():
    w = torch.randn(4, 128) * 0.02
    w[2, 70] = 1e6  # row 2, group 1 at group size 64: its 4-bit step would be ~66,700 > 65504
    with pytest.raises(ValueError, match=r"weight row 2, group 1 spans 1e\+06, which needs a scale above "
                                         r"float16's 65504 at 4 bits"):
        ops.quant_params(w, 4, 64, 0)
    w[2, 70] = 9e5  # 60,000 a step: still representable, and quantized as such
    scale, _ = ops.quant_params(w, 4, 64, 0)
    assert torch.isfinite(scale.float()).all() and float(scale.float().max()) < 65504


@pytest.mark.parametrize("make", [
    lambda: ops.quant_params(torch.randn(2, 64), 4.0, 64, 0),
    lambda: __import__("brecq_ext").QuantLinear(64, 8, 4.0, 64),
    lambda: __import__("brecq_ext").LayerRule("proj", 4.0, 64),
], ids=["op", "QuantLinear", "LayerRule"])
def test_float_bits_get_the_bits_message(make):
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 8\], got 4.0"):
        make()


def test_a_saved_recipe_with_fractional_bits_is_refused():
    from brecq.quantization.recipe import Recipe

    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 8\], got 4.5"):
        Recipe.from_dict({"name": "x", "rules": [{"pattern": "proj", "bits": 4.5, "group_size": 64}]})
