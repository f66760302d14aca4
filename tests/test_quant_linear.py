import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from brecq_ext import Clipping, LayerRule, Layout, QuantLinear, match_linear_layers, ops, replace_linear_layers

from conftest import STORIES260K, require_shared


def _stories_weights():
    return load_file(str(require_shared(STORIES260K) / "model.safetensors"))


@pytest.mark.parametrize("name,bits", [("model.layers.0.mlp.down_proj.weight", 4),
                                       ("model.layers.2.mlp.gate_proj.weight", 4),
                                       ("model.layers.1.self_attn.q_proj.weight", 6),
                                       ("model.layers.4.self_attn.k_proj.weight", 6)])
@pytest.mark.parametrize("rows", [1, 5, 64], ids=lambda m: f"m{m}")
def test_real_layer_matches_dense_layer_with_dequantized_weight(name, bits, rows):
    weight = _stories_weights()[name]
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False)
    linear.weight.data.copy_(weight)
    qlinear = QuantLinear.from_linear(linear, bits=bits, group_size=64)
    dense = nn.Linear(in_features, out_features, bias=False)
    dense.weight.data.copy_(qlinear.dequantized_weight())
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        y, y_dense, y_fp = qlinear(x), dense(x), linear(x)
    assert torch.allclose(y, y_dense, rtol=1e-5, atol=1e-5)
    # And the quantized layer is a good approximation of the original one.
    rel = (y - y_fp).norm() / y_fp.norm()
    assert rel < (0.12 if bits == 4 else 0.03)


def test_state_dict_round_trip_through_safetensors_is_exact(tmp_path):
    linear = nn.Linear(172, 33, bias=True)
    qlinear = QuantLinear.from_linear(linear, bits=6, group_size=64)
    save_file(qlinear.state_dict(), str(tmp_path / "layer.safetensors"))
    restored = QuantLinear(172, 33, bits=6, group_size=64, bias=True)
    restored.load_state_dict(load_file(str(tmp_path / "layer.safetensors")))
    for key, value in qlinear.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    x = torch.randn(3, 172)
    assert torch.equal(qlinear(x), restored(x))


def test_loading_a_state_dict_of_another_bit_width_fails():
    q4 = QuantLinear.from_linear(nn.Linear(128, 8), bits=4, group_size=64)
    q6 = QuantLinear(128, 8, bits=6, group_size=64, bias=True)
    with pytest.raises(RuntimeError, match="size mismatch for packed"):
        q6.load_state_dict(q4.state_dict())


def test_construction_from_codes_and_extra_repr():
    codes = torch.randint(0, 16, (5, 100), dtype=torch.uint8)
    scale = torch.full((5, 2), 0.01, dtype=torch.float16)
    zero = torch.full((5, 2), 8, dtype=torch.uint8)
    layer = QuantLinear.from_codes(codes, scale, zero, bits=4, group_size=64)
    assert torch.equal(layer.codes(), codes)
    expected = (codes.float() - 8) * scale[0, 0].float()
    assert torch.equal(layer.dequantized_weight(), expected)
    text = repr(layer)
    assert "in_features=100, out_features=5, bits=4, group_size=64, bias=False" in text
    assert "bits_per_weight=" in text


def test_memory_is_the_packed_bytes_not_dense():
    linear = nn.Linear(1024, 3072, bias=False)
    layer = QuantLinear.from_linear(linear, bits=4, group_size=64, clipping=Clipping.MINMAX)
    dense_bytes = linear.weight.numel() * 4
    assert layer.memory_bytes() == 3072 * 512 + 3072 * 16 * 3
    assert dense_bytes / layer.memory_bytes() == pytest.approx(32 / 4.375)
    assert not any(t.dtype.is_floating_point and t.numel() == linear.weight.numel() for t in layer.buffers())


MIXED = (LayerRule(r"self_attn\.(q|k|v|o)_proj$", 6, 64), LayerRule(r"mlp\.(gate|up|down)_proj$", 4, 64))


def _stories_model():
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(require_shared(STORIES260K)))
    return model.eval()


def _kl_per_token(logits, reference):
    return torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                      reduction="none").sum(-1).mean().item()


def test_replacing_the_layers_of_the_real_model():
    model = _stories_model()
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    replaced = replace_linear_layers(model, MIXED)
    assert len(replaced) == 5 * 7
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    assert model.model.layers[3].mlp.down_proj.bits == 4
    assert model.model.layers[3].self_attn.o_proj.bits == 6
    with torch.no_grad():
        kl_mixed = _kl_per_token(model(ids).logits, reference)
    w8 = _stories_model()
    replace_linear_layers(w8, {r"(self_attn|mlp)\.\w+_proj$": (8, 64)})
    with torch.no_grad():
        kl_w8 = _kl_per_token(w8(ids).logits, reference)
    # More bits, closer to the original; the mixed W6/W4 model stays close too (0.065 measured).
    assert kl_w8 < kl_mixed / 4
    assert kl_mixed < 0.15, f"KL per token {kl_mixed:.4f}"


def test_rules_are_validated():
    model = nn.Sequential()
    model.add_module("attn", nn.Linear(64, 64))
    model.add_module("mlp", nn.Linear(64, 64))
    with pytest.raises(ValueError, match="bits must be an integer"):
        LayerRule("attn", 9, 64)
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        LayerRule("attn", 4, 0)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        LayerRule("attn(", 4, 64)
    with pytest.raises(ValueError, match=r"rules match no nn.Linear layer of the model: \['lm_head'\]"):
        match_linear_layers(model, [LayerRule("attn", 4, 64), LayerRule("lm_head", 8, 64)])
    with pytest.raises(ValueError, match="matched by rules that disagree"):
        match_linear_layers(model, {"attn": (4, 64), "a.t": (6, 64)})
    # Agreeing overlaps are fine.
    assert set(match_linear_layers(model, {"attn": (4, 64), "at": (4, 64)})) == {"attn"}


def test_dtype_casts_of_the_model_keep_the_packed_format():
    dense = nn.Linear(128, 24)
    layer = QuantLinear.from_linear(dense, 4, 64)
    x = torch.randn(3, 128)
    before = layer(x)
    model = nn.Sequential(layer).to(torch.bfloat16)
    assert layer.scale.dtype == torch.float16 and layer.zero.dtype == torch.uint8
    assert layer.packed.dtype == torch.uint8 and layer.bias.dtype == torch.float32
    assert torch.equal(model.half()[0].scale, layer.scale)
    assert torch.allclose(model(x.to(torch.bfloat16)).float(), before, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("layout, expected", [(Layout.ROWS, r"\(24, 64\)"), (Layout.TILE16, r"\(2, 16, 64\)")],
                         ids=["rows", "tile16"])
def test_forward_rechecks_buffers_that_were_replaced(layout, expected):
    # forward caches its buffer validation on the buffer objects; a swapped-in buffer of the wrong
    # shape must be caught by the op's checks instead of reaching the kernel unchecked.
    layer = QuantLinear.from_linear(nn.Linear(128, 24), 4, 64, layout=layout)
    x = torch.randn(1, 128)
    layer(x)
    layer.packed = torch.zeros(*layer.packed.shape[:-1], 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="packed must have shape " + expected):
        layer(x)


@pytest.mark.parametrize("layout", [Layout.ROWS, Layout.TILE16], ids=["rows", "tile16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("shape", [(172,), (1, 172), (3, 172), (1, 1, 172), (2, 3, 172), (2, 1, 2, 172), (0, 172),
                                   (40, 172)], ids=lambda s: "x".join(map(str, s)))
def test_inference_forward_equals_the_op_for_every_input_shape(layout, dtype, shape):
    # Decode-sized inference forwards skip the op and allocate their output in x's shape directly;
    # whatever the rank, they must give the op's result bit for bit (the same kernel runs).
    layer = QuantLinear.from_linear(nn.Linear(172, 24), 4, 64, layout=layout)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))).to(dtype)
    op = ops.tile16_matmul if layout is Layout.TILE16 else ops.packed_matmul
    layer_arguments = (4, 64, 172, 24) if layout is Layout.TILE16 else (4, 64, 172)
    expected = op(x, layer.packed, layer.scale, layer.zero, layer.bias, *layer_arguments)
    with torch.inference_mode():
        y = layer(x)
    assert y.shape == (*shape[:-1], 24) and y.dtype == dtype and y.is_contiguous()
    assert torch.equal(y, expected)
    strided = torch.randn(*shape[:-1], 2 * 172).to(dtype)[..., ::2]  # rows the kernels cannot take as they are
    with torch.inference_mode():
        assert torch.equal(layer(strided), op(strided.contiguous(), layer.packed, layer.scale, layer.zero, layer.bias,
                                              *layer_arguments))
