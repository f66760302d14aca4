"""brecq_ext.norm (torch.ops.brecq.rms_norm) against its reference and transformers' own RMSNorm
modules, and fuse_rms_norms_ on whole models."""
from __future__ import annotations

import copy

import pytest
import torch
from brecq.models import build_model, qwen3_config

from brecq_ext import RMSNorm, fuse_rms_norms_, reference
from brecq_ext import norm as norm_ops

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.bfloat16, id="bf16")]
# (leading shape, n): a decode token, q_norm's heads, a prefill, one odd-sized row, a long row
SHAPES = [((1, 1), 1024), ((1, 16, 1), 128), ((3, 37), 1024), ((1,), 7), ((2,), 5000)]


def _inputs(lead, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, n, generator=gen) * 3).to(dtype)
    weight = (torch.rand(n, generator=gen) + 0.5).to(dtype)
    return x, weight


def _assert_matches_formula(out, expected, dtype):
    if dtype is torch.float32:
        torch.testing.assert_close(out, expected, rtol=2e-6, atol=1e-6)
    else:  # an ulp where the float32 sum's order moves a rounding; almost everywhere equal
        torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=0)
        assert (out != expected).float().mean() < 0.01


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, (*s[0], s[1]))))
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_against_reference(dtype, shape):
    lead, n = shape
    x, weight = _inputs(lead, n, dtype)
    out = norm_ops.rms_norm(x, weight, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    _assert_matches_formula(out, reference.rms_norm(x, weight, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_transformers_modules_give_the_same_rows(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    x, weight = _inputs((4, 9), 256, dtype, seed=2)
    for cls in (Qwen3RMSNorm, LlamaRMSNorm):
        theirs = cls(256, eps=1e-5).to(dtype)
        theirs.weight.data.copy_(weight)
        ours = RMSNorm.from_module(theirs)
        assert ours.weight is theirs.weight and ours.variance_epsilon == 1e-5
        with torch.inference_mode():
            _assert_matches_formula(ours(x), theirs(x), dtype)
            assert torch.equal(reference.rms_norm(x, weight, 1e-5), theirs(x))  # the reference is their formula


def test_strided_rows_and_threads():
    x, weight = _inputs((8,), 3000, torch.float32)
    expected = norm_ops.rms_norm(x, weight, 1e-6)
    wide = torch.zeros(8, 3100)
    wide[:, 50:3050] = x
    assert torch.equal(norm_ops.rms_norm(wide[:, 50:3050], weight, 1e-6), expected)  # rows 3100 apart
    assert torch.equal(norm_ops.rms_norm(x.t().contiguous().t(), weight, 1e-6), expected)  # copied first
    big, big_weight = _inputs((64,), 2048, torch.bfloat16)  # enough rows for the parallel loop
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = norm_ops.rms_norm(big, big_weight, 1e-6)
        torch.set_num_threads(max(2, previous))
        many = norm_ops.rms_norm(big, big_weight, 1e-6)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, many)


def test_module_falls_back_to_the_formula():
    x, weight = _inputs((2, 3), 64, torch.float32)
    module = RMSNorm(64, eps=1e-6)
    module.weight.data.copy_(weight)
    # autograd: the formula, differentiable
    x_grad = x.clone().requires_grad_(True)
    module(x_grad).sum().backward()
    assert x_grad.grad is not None and module.weight.grad is not None
    # a weight of another dtype: transformers' promotion (float32 out of bfloat16 in)
    with torch.no_grad():
        out = module(x.bfloat16())
    assert out.dtype == torch.float32
    assert torch.equal(out, reference.rms_norm(x.bfloat16(), module.weight, 1e-6))
    # float16 has no kernel: the reference
    with torch.no_grad():
        half = RMSNorm.from_module(copy.deepcopy(module).half())
        assert torch.equal(half(x.half()), reference.rms_norm(x.half(), half.weight, 1e-6))


def test_compiles_to_the_formula_without_graph_breaks():
    x, weight = _inputs((1, 1), 128, torch.float32)
    module = RMSNorm(128)
    module.weight.data.copy_(weight)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), module(x), rtol=2e-6, atol=1e-6)


def _bad():
    x, weight = _inputs((2,), 8, torch.float32)
    return [
        pytest.param((x.int(), weight, 1e-6), TypeError, "x must have dtype", id="x-dtype"),
        pytest.param((x, weight.double(), 1e-6), TypeError, "weight must have dtype float32", id="weight-dtype"),
        pytest.param((x, weight[:5], 1e-6), ValueError, "n = weight's length 5", id="length"),
        pytest.param((x, weight.view(2, 4), 1e-6), ValueError, "weight must be 1-D", id="weight-ndim"),
        pytest.param((x, weight, -1.0), ValueError, "eps must be a finite number >= 0", id="eps"),
    ]


@pytest.mark.parametrize("args,error,message", _bad())
def test_bad_input_names_the_argument(args, error, message):
    with pytest.raises(error, match=message):
        norm_ops.rms_norm(*args)


class _NoEps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(4))


def test_from_module_needs_a_weight_and_eps():
    with pytest.raises(TypeError, match="_NoEps has no 1-D weight parameter and variance_epsilon/eps"):
        RMSNorm.from_module(_NoEps())


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_model_decodes_like_the_original(dtype):
    config = qwen3_config("0.6b", num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=16, vocab_size=500)
    model = build_model(config, seed=0).eval().to(dtype)
    fused = copy.deepcopy(model)
    assert fuse_rms_norms_(fused) == 2 * 4 + 1  # per layer: input, post-attention, q_norm, k_norm; the final norm
    assert not any(type(m).__name__ == "Qwen3RMSNorm" for m in fused.modules())
    assert fused.state_dict().keys() == model.state_dict().keys()
    ids = torch.randint(0, 500, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected = model(ids).logits
        got = fused(ids).logits
        tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype is torch.float32 else {"rtol": 0.05, "atol": 0.05}
        torch.testing.assert_close(got.float(), expected.float(), **tolerance)
        tokens = [model.generate(ids, max_new_tokens=6, do_sample=False),
                  fused.generate(ids, max_new_tokens=6, do_sample=False)]
    if dtype is torch.float32:
        assert torch.equal(tokens[0], tokens[1])
