"""fuse_projections_: q/k/v and gate/up siblings as one packed matmul, same results."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from brecq_ext import FusedProjection, FusedQuantLinear, Layout, QuantLinear, fuse_projections_, quant_linear_layers

from conftest import DEVICES


def _tiny_quantized_model(recipe: str = "w4g64_mix_attn6"):
    from brecq.models import build_model, qwen3_config
    from brecq.quantization.quantize import quantize
    from brecq.quantization.recipe import Method, get_recipe

    model = build_model(qwen3_config("tiny"), seed=0)
    quantize(model, get_recipe(recipe, Method.RTN), show_progress=False)
    return model.to(torch.bfloat16).eval()


class _Siblings(nn.Module):
    """Three projections of one input, as an attention block calls them."""

    def __init__(self, layers):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = layers

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def _layers(in_features, outs, bits=4, group_size=64, biases=(False, False, False), device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for out, bias in zip(outs, biases):
        dense = nn.Linear(in_features, out, bias=bias)
        with torch.no_grad():
            dense.weight.copy_(torch.randn(out, in_features, generator=gen))
            if bias:
                dense.bias.copy_(torch.randn(out, generator=gen))
        layers.append(QuantLinear.from_linear(dense, bits, group_size).to(device))
    return layers


@pytest.mark.parametrize("device", DEVICES)
def test_fused_model_gives_the_unfused_logits_and_tokens(device):
    model = _tiny_quantized_model().to(device)
    fused = copy.deepcopy(model)
    names = fuse_projections_(fused)
    layers = model.config.num_hidden_layers
    assert sorted(names) == sorted([f"model.layers.{i}.self_attn.qkv_proj" for i in range(layers)]
                                   + [f"model.layers.{i}.mlp.gate_up_proj" for i in range(layers)])
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        expected, got = model(ids).logits, fused(ids).logits
        if device == "cpu":  # each output row is accumulated as in the separate layers
            assert torch.equal(got, expected)
        else:  # the CUDA kernel and tuning depend on the layer's row count
            torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
        one = ids[:1, :6]
        assert torch.equal(fused.generate(one, max_new_tokens=6, do_sample=False),
                           model.generate(one, max_new_tokens=6, do_sample=False))


def test_fused_layers_hold_the_same_bytes_once():
    model = _tiny_quantized_model()
    fused = copy.deepcopy(model)
    fuse_projections_(fused)
    assert (sum(layer.memory_bytes() for _, layer in quant_linear_layers(fused))
            == sum(layer.memory_bytes() for _, layer in quant_linear_layers(model)))
    keys = set(fused.state_dict())
    assert "model.layers.0.self_attn.qkv_proj.packed" in keys and "model.layers.0.mlp.gate_up_proj.scale" in keys
    assert not any(".q_proj." in key or ".gate_proj." in key for key in keys)
    attention = fused.model.layers[0].self_attn
    assert isinstance(attention.k_proj, FusedProjection) and attention.k_proj.fused is attention.qkv_proj
    assert (attention.q_proj.out_features, attention.k_proj.out_features) == (128, 64)
    # A copy keeps each member pointing at its own parent's fused layer, not the original's.
    again = copy.deepcopy(fused).model.layers[0].self_attn
    assert again.v_proj.fused is again.qkv_proj and again.qkv_proj is not attention.qkv_proj


def test_one_fused_product_serves_the_members_of_one_input(monkeypatch):
    layers = _layers(100, (48, 16, 32))
    expected = [layer(torch.ones(1, 100)) for layer in layers]  # warm the buffers' check cache
    block = _Siblings(layers)
    fuse_projections_(block)
    calls = []
    forward = FusedQuantLinear.forward
    monkeypatch.setattr(FusedQuantLinear, "forward", lambda self, x: calls.append(x) or forward(self, x))
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(2))
    expected = [layer(x) for layer in layers]
    got = block(x)
    assert len(calls) == 1
    for e, g in zip(expected, got):
        assert torch.equal(g, e)
    assert block.qkv_proj._pending_input is None  # released after the last member
    # A member called on another tensor computes its own product, never a stale share.
    y = torch.randn(3, 100, generator=torch.Generator().manual_seed(3))
    assert torch.equal(block.q_proj(x), expected[0])
    assert torch.equal(block.k_proj(y), layers[1](y))
    assert torch.equal(block.v_proj(x), expected[2])
    assert len(calls) == 4


@pytest.mark.parametrize("layout", [Layout.ROWS, Layout.TILE16, None], ids=["rows", "tile16", "auto"])
@pytest.mark.parametrize("bits", [4, 6])
def test_fused_layer_equals_its_members_with_and_without_bias(bits, layout):
    layers = [layer.use_layout(layout) for layer in _layers(172, (33, 16, 7), bits=bits, biases=(True, False, True))]
    fused = FusedQuantLinear.from_members(layers)
    assert fused.split_sizes == (33, 16, 7) and fused.bias is not None
    assert fused.layout is (layout or layers[0].layout)
    assert torch.equal(fused.codes(), torch.cat([layer.codes() for layer in layers]))
    x = torch.randn(5, 172, generator=torch.Generator().manual_seed(4))
    assert torch.equal(fused(x), torch.cat([layer(x) for layer in layers], dim=-1))


def test_members_that_differ_stay_unfused(caplog):
    block = _Siblings(_layers(128, (64, 64, 64)))
    block.k_proj = _layers(128, (64,), bits=6)[0]
    with caplog.at_level(logging.INFO, logger="brecq_ext"):
        assert fuse_projections_(block) == []
    assert "differ in bits (4 and 6)" in caplog.text
    assert isinstance(block.q_proj, QuantLinear) and not hasattr(block, "qkv_proj")
    with pytest.raises(ValueError, match="members differ in bits"):
        FusedQuantLinear.from_members([block.q_proj, block.k_proj])


def test_dense_members_stay_unfused_and_name_clashes_are_refused():
    model = nn.Module()
    model.q_proj, model.k_proj, model.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
    assert fuse_projections_(model) == []
    block = _Siblings(_layers(64, (16, 16, 16)))
    block.qkv_proj = nn.Identity()
    with pytest.raises(ValueError, match="already has an attribute 'qkv_proj'"):
        fuse_projections_(block)
    with pytest.raises(ValueError, match="split_sizes must be two or more positive"):
        FusedQuantLinear(64, (16,), 4, 64)
    with pytest.raises(TypeError, match="with from_members"):
        FusedQuantLinear.from_linear(nn.Linear(64, 16), 4, 64)


def test_compiled_decode_step_runs_one_matmul_per_fused_group():
    from brecq.measurement.measure import StaticDecoder

    model = _tiny_quantized_model()
    fuse_projections_(model)
    graphs = []

    def record(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    decoder = StaticDecoder(model, 24, use_graph=False)
    decoder._step_forward = torch.compile(decoder._forward, backend=record, fullgraph=True, dynamic=False)
    with torch.no_grad():
        token = decoder.prefill(torch.randint(0, model.config.vocab_size, (1, 5)))
        decoder.step(token)
    torch._dynamo.reset()
    matmuls = [node for gm in graphs for node in gm.graph.nodes
               if node.op == "call_function" and "brecq" in str(node.target)]
    # Per decoder layer: qkv, o, gate_up, down (the tied lm_head stays dense).
    assert len(graphs) == 1 and len(matmuls) == 4 * model.config.num_hidden_layers


@pytest.mark.parametrize("regather", [True, False], ids=["regather", "keep"])
def test_fused_cpu_layers_join_the_shared_region_of_the_others(regather):
    model = _tiny_quantized_model()  # quantize gathers CPU layers into one region
    fuse_projections_(model, regather=regather)
    storages = {layer.packed.untyped_storage().data_ptr() for _, layer in quant_linear_layers(model)}
    fused = model.model.layers[0].self_attn.qkv_proj
    in_region = fused.packed.untyped_storage().nbytes() > fused.packed.numel()
    assert in_region is regather
    assert len(storages) == (1 if regather else 1 + 2 * model.config.num_hidden_layers)


def test_a_loaded_model_fuses_and_a_fused_one_is_not_saved(tmp_path):
    from brecq.io import load_quantized, save_quantized
    from brecq.quantization.recipe import get_recipe

    model = _tiny_quantized_model()
    out = save_quantized(model, tmp_path / "saved", recipe=get_recipe("w4g64_mix_attn6").to_dict(), calibration=None)
    reference, loaded = load_quantized(out), load_quantized(out, fuse_projections=True)
    fused = [name for name, module in loaded.named_modules() if isinstance(module, FusedQuantLinear)]
    assert len(fused) == 2 * model.config.num_hidden_layers
    # Fused before the one gathering: every layer, fused or not, reads from one region.
    assert len({layer.packed.untyped_storage().data_ptr() for _, layer in quant_linear_layers(loaded)}) == 1
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
    with pytest.raises(ValueError, match="save_quantized: model has fused projections"):
        save_quantized(loaded, tmp_path / "fused", recipe={}, calibration=None)
    assert not (tmp_path / "fused").exists()


def test_the_fused_layer_takes_its_first_members_place_in_module_order():
    model = _tiny_quantized_model()
    fuse_projections_(model)
    layer = model.model.layers[0]
    assert list(layer.self_attn._modules)[:4] == ["qkv_proj", "q_proj", "k_proj", "v_proj"]
    assert list(layer.mlp._modules)[:3] == ["gate_up_proj", "gate_proj", "up_proj"]
    # So the shared region holds each layer's weights in the order a decode step reads them.
    names = [name for name, _ in quant_linear_layers(model)][:4]
    assert names == ["model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj",
                     "model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"]
    addresses = [layer.packed.data_ptr() for _, layer in quant_linear_layers(model)]
    assert addresses == sorted(addresses)
