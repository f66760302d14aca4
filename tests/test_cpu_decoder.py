"""The C++ decode runtime (csrc/cpu/decoder.cpp, brecq.runtime) against transformers' own forward on
the same models: every supported architecture, float32 and bfloat16, quantized and dense layers,
GQA ratios, unusual head sizes, cache growth, the prefill handover, sampling, stop tokens, bad input
and the fallback."""
from __future__ import annotations

import pytest
import torch
from brecq.models import build_model, small_config
from brecq.runtime import (
    CpuDecoder,
    Sampling,
    UnsupportedModel,
    generate,
    unsupported_reason,
)
from conftest import SHARED, require_shared
from torch import nn

from brecq_ext import Layout, quant_linear_layers
from brecq_ext._extension import cpu_kernels
from brecq_ext.quant_linear import replace_linear_layers

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="compiled CPU kernels not built")

ARCHITECTURES = ("qwen3", "llama", "qwen2", "mistral")
STUDY_RULES = {r"self_attn\.[qkvo]_proj$": (6, 64), r"mlp\.": (4, 64)}
VOCAB = 300


def _model(model_type="qwen3", dtype=torch.float32, rules=STUDY_RULES, seed=1, **overrides):
    model = build_model(small_config(model_type, VOCAB, **overrides), seed=seed, dtype=dtype)
    if rules:
        replace_linear_layers(model, rules)
    return model.eval()


def _transformers_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0].float()


def _float64_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The same model's logits in float64: packed layers become dense float64 ones with the
    dequantized weights, so this is the exact value both runtimes approximate."""
    import copy

    exact = copy.deepcopy(model)
    for name, layer in list(quant_linear_layers(exact)):
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        dense.weight.data = layer.dequantized_weight(torch.float32).double()
        if layer.bias is not None:
            dense.bias.data = layer.bias.double()
        parent, _, child = name.rpartition(".")
        setattr(exact.get_submodule(parent) if parent else exact, child, dense)
    exact = exact.double()
    with torch.no_grad():
        return exact(ids).logits[0]


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@pytest.mark.parametrize("quantized", [True, False], ids=["w6w4", "dense"])
def test_float32_logits_equal_transformers(model_type, quantized):
    model = _model(model_type, rules=STUDY_RULES if quantized else None)
    ids = _ids(40)
    expected = _transformers_logits(model, ids)
    decoder = CpuDecoder(model)
    whole = decoder.forward(ids, all_logits=True)  # the prompt in chunks of 8
    decoder.reset()
    stepwise = torch.stack([decoder.forward(ids[0, i:i + 1]).clone() for i in range(ids.shape[1])])
    scale = expected.abs().max()
    assert (whole - expected).abs().max() <= 2e-5 * scale
    assert (stepwise - expected).abs().max() <= 2e-5 * scale
    assert torch.equal(whole.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_bfloat16_as_close_as_transformers_own_bfloat16(model_type):
    """In bfloat16 both paths round at the same points; neither is exact. The runtime must be no
    further from the float64 value than transformers' own bfloat16 forward is (with a small margin
    for where accumulation order flips a rounding)."""
    model = _model(model_type, dtype=torch.bfloat16)
    ids = _ids(40)
    exact = _float64_logits(model, ids)
    transformers_error = (_transformers_logits(model, ids).double() - exact).abs()
    decoder = CpuDecoder(model)
    ours = torch.stack([decoder.forward(ids[0, i:i + 1]).clone() for i in range(ids.shape[1])]).double()
    runtime_error = (ours - exact).abs()
    assert runtime_error.max() <= 1.5 * transformers_error.max() + 0.02
    assert runtime_error.mean() <= 1.5 * transformers_error.mean() + 1e-3


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_bfloat16_prompt_chunks_equal_single_steps(model_type):
    """A prompt run in chunks of 8 rows (each row's q, attention output and cache append at its own
    offset) gives the logits that one token per call gives, bit for bit."""
    model = _model(model_type, dtype=torch.bfloat16)
    ids = _ids(21)
    decoder = CpuDecoder(model)
    whole = decoder.forward(ids, all_logits=True).clone()
    decoder.reset()
    stepwise = torch.stack([decoder.forward(ids[0, i:i + 1]).clone() for i in range(ids.shape[1])])
    assert torch.equal(whole, stepwise)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_team_size_changes_between_calls(dtype):
    """set_threads between steps: every item is computed whole by one thread, so the split (and the
    work sharing, rebuilt for the new team) does not change a bit of the logits."""
    model = _model("qwen3", dtype=dtype)
    ids = _ids(12)
    decoder = CpuDecoder(model)
    expected = torch.stack([decoder.forward(ids[0, i:i + 1]).clone() for i in range(ids.shape[1])])
    for threads in (1, 3, 2):
        decoder.reset()
        decoder._runtime.set_threads(threads)
        assert decoder._runtime.threads == threads
        got = torch.stack([decoder.forward(ids[0, i:i + 1]).clone() for i in range(ids.shape[1])])
        assert torch.equal(got, expected), f"{threads} threads"


@pytest.mark.parametrize("kv_heads", [8, 4, 2, 1], ids=lambda h: f"gqa{8 // h}")
@pytest.mark.parametrize("head_dim", [24, 40, 72])
def test_gqa_ratios_and_head_sizes(kv_heads, head_dim):
    model = _model("qwen3", rules={r"self_attn\.[qkvo]_proj$": (5, 32), r"mlp\.": (3, 16)}, num_attention_heads=8,
                   num_key_value_heads=kv_heads, head_dim=head_dim, hidden_size=96, intermediate_size=200)
    ids = _ids(19)
    expected = _transformers_logits(model, ids)
    got = CpuDecoder(model).forward(ids, all_logits=True)
    assert (got - expected).abs().max() <= 2e-5 * expected.abs().max()


WIDTHS_AND_LAYOUTS = ([pytest.param(bits, Layout.ROWS, id=f"w{bits}-rows") for bits in range(2, 9)]
                      + [pytest.param(bits, Layout.TILE16, id=f"w{bits}-tile16") for bits in (4, 6, 8)])


@pytest.mark.parametrize("bits, layout", WIDTHS_AND_LAYOUTS)
def test_every_width_and_layout_with_a_quantized_head(bits, layout, isa):
    model = _model("llama", rules={r"(self_attn|mlp)\.|^lm_head$": (bits, 32)})
    for _, layer in quant_linear_layers(model):
        layer.use_layout(layout)
    ids = _ids(12)
    expected = _transformers_logits(model, ids)
    got = CpuDecoder(model).forward(ids, all_logits=True)
    assert (got - expected).abs().max() <= 2e-5 * expected.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_projections_of_one_input_with_mixed_widths_layouts_and_dense(dtype, isa):
    """q/k/v and gate/up run as one loop when all are TILE16 (any widths and group sizes), one by
    one otherwise: both give transformers' logits."""
    rules = {r"q_proj$": (6, 64), r"k_proj$": (5, 32), r"o_proj$": (4, 64), r"gate_proj$": (4, 64),
             r"up_proj$": (8, 32), r"down_proj$": (6, 64)}  # v_proj stays dense
    model = _model("qwen3", dtype=dtype, rules=rules)
    for name, layer in quant_linear_layers(model):
        layer.use_layout(Layout.ROWS if name.endswith("k_proj") else Layout.TILE16)
    ids = _ids(12)
    if dtype is torch.float32:
        expected = _transformers_logits(model, ids)
        got = CpuDecoder(model).forward(ids, all_logits=True)
        assert (got - expected).abs().max() <= 2e-5 * expected.abs().max()
        return
    exact = _float64_logits(model, ids)
    transformers_error = (_transformers_logits(model, ids).double() - exact).abs()
    decoder = CpuDecoder(model)
    ours = torch.stack([decoder.forward(ids[0, i:i + 1]).clone() for i in range(ids.shape[1])]).double()
    assert (ours - exact).abs().max() <= 1.5 * transformers_error.max() + 0.02


def test_cache_grows_past_its_first_allocation_and_truncates():
    model = _model("qwen3")
    ids = _ids(300)  # the cache starts with room for 256 positions
    expected = _transformers_logits(model, ids)
    decoder = CpuDecoder(model)
    first = decoder.forward(ids[0, :250], all_logits=True)
    rest = torch.stack([decoder.forward(ids[0, i:i + 1]).clone() for i in range(250, 300)])
    got = torch.cat([first, rest])
    assert decoder.length == 300 and decoder._runtime.capacity >= 300
    assert (got - expected).abs().max() <= 2e-5 * expected.abs().max()
    decoder.truncate(100)  # a shorter prefix stays valid: rerun the rest
    again = decoder.forward(ids[0, 100:], all_logits=True)
    assert (again - expected[100:]).abs().max() <= 2e-5 * expected.abs().max()


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
], ids=lambda r: r["rope_type"])
def test_rope_scalings_fixed_at_load(rope):
    model = _model("llama", rope_parameters=rope)
    ids = _ids(40)
    expected = _transformers_logits(model, ids)
    got = CpuDecoder(model).forward(ids, all_logits=True)
    assert (got - expected).abs().max() <= 2e-5 * expected.abs().max()


def test_dynamic_rope_scaling_is_refused():
    model = _model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert "dynamic" in unsupported_reason(model)


def test_sliding_window_attention():
    model = _model("mistral", sliding_window=8)
    ids = _ids(30)
    expected = _transformers_logits(model, ids)
    got = CpuDecoder(model).forward(ids, all_logits=True)
    assert (got - expected).abs().max() <= 2e-5 * expected.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_prefill_handover_from_transformers(dtype):
    from brecq.runtime.generate import HANDOVER_MIN_TOKENS, prefill

    model = _model("qwen3", dtype=dtype)
    ids = _ids(HANDOVER_MIN_TOKENS + 9)
    decoder = CpuDecoder(model)
    handed_over = prefill(decoder, ids[0])  # transformers' batched forward, its cache handed over
    assert decoder.length == ids.shape[1]
    next_handed = decoder.forward([7]).clone()
    decoder.reset()
    own = decoder.forward(ids[0]).clone()
    next_own = decoder.forward([7]).clone()
    tolerance = 2e-5 if dtype is torch.float32 else 0.1
    assert (handed_over - own).abs().max() <= tolerance * own.abs().max()
    assert (next_handed - next_own).abs().max() <= tolerance * next_own.abs().max()


def _greedy_matches_transformers(model, prompt: torch.Tensor, tokens: int = 256):
    ours = generate(model, prompt, tokens, eos_token_id=[])
    model.generation_config.eos_token_id = None  # run all the way, without masking any token
    with torch.no_grad():
        theirs = model.generate(prompt, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    assert ours.shape == theirs.shape == (1, prompt.shape[1] + tokens)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
def test_greedy_256_tokens_identical_on_seeded_models(model_type):
    _greedy_matches_transformers(_model(model_type, initializer_range=0.2), _ids(20, seed=3))


def test_greedy_256_tokens_identical_on_stories260k():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = require_shared(SHARED / "models" / "stories260k")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    # down_proj's 172 inputs are padded to 6 groups of 32 (docs/FORMAT.md)
    replace_linear_layers(model, {r"self_attn\.[qkvo]_proj$": (6, 32), r"mlp\.": (4, 32)})
    prompt = AutoTokenizer.from_pretrained(path)("Once upon a time, there was a", return_tensors="pt").input_ids
    _greedy_matches_transformers(model, prompt)


def test_stop_tokens_and_streaming():
    model = _model("qwen3", initializer_range=0.2)
    prompt = _ids(6)
    free = generate(model, prompt, 12, eos_token_id=[])
    stop = int(free[0, prompt.shape[1] + 4])
    seen = []
    stopped = generate(model, prompt, 12, eos_token_id=stop, on_token=seen.append)
    first_stop = free[0, prompt.shape[1]:].tolist().index(stop)
    assert stopped.shape[1] == prompt.shape[1] + first_stop + 1  # the stop token is kept, as transformers does
    assert seen == stopped[0, prompt.shape[1]:].tolist()
    assert generate(model, prompt, 0).shape == prompt.shape


def test_sampling_is_seeded_and_restricted():
    model = _model("qwen3")
    prompt = _ids(5)
    kwargs = {"do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 0.9, "eos_token_id": []}
    a = generate(model, prompt, 20, seed=11, **kwargs)
    assert torch.equal(a, generate(model, prompt, 20, seed=11, **kwargs))
    assert not torch.equal(a, generate(model, prompt, 20, seed=12, **kwargs))
    assert torch.equal(generate(model, prompt, 20, do_sample=True, top_k=1, seed=5, eos_token_id=[]),
                       generate(model, prompt, 20, eos_token_id=[]))

    logits = torch.tensor([3.0, 2.9, 0.0, -1.0, -5.0])
    drawn = {Sampling(True, top_k=2).choose(logits, torch.Generator().manual_seed(s)) for s in range(200)}
    assert drawn == {0, 1}
    # top_p: token 0 has p = 0.51, so top_p 0.5 keeps it alone and 0.9 keeps 0 and 1
    assert {Sampling(True, top_p=0.5).choose(logits, torch.Generator().manual_seed(s)) for s in range(100)} == {0}
    assert {Sampling(True, top_p=0.9).choose(logits, torch.Generator().manual_seed(s)) for s in range(200)} == {0, 1}
    # frequencies follow the softmax at temperature 2
    probabilities = torch.softmax(logits / 2, 0)
    counts = torch.bincount(torch.tensor([Sampling(True, temperature=2.0).choose(logits, generator)
                                          for generator in [torch.Generator().manual_seed(1)] for _ in range(4000)]),
                            minlength=5).double() / 4000
    assert (counts - probabilities).abs().max() < 0.03


@pytest.mark.parametrize("bad, message", [
    ({"do_sample": True, "temperature": 0.0}, "temperature"),
    ({"do_sample": True, "top_k": -1}, "top_k"),
    ({"do_sample": True, "top_p": 0.0}, "top_p"),
    ({"do_sample": "yes"}, "do_sample"),
])
def test_bad_sampling_settings(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        generate(_model("qwen3", rules=None), _ids(3), 2, **bad)


def test_bad_input_is_refused_with_a_clear_error():
    model = _model("qwen3")
    decoder = CpuDecoder(model)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decoder.forward([VOCAB])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decoder.forward([-1])
    assert decoder.length == 0  # nothing was appended
    with pytest.raises(ValueError, match="empty"):
        decoder.forward([])
    with pytest.raises(ValueError, match="one sequence"):
        generate(model, _ids(4).repeat(2, 1), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, _ids(4), -1)
    with pytest.raises(TypeError, match="integer token ids"):
        generate(model, torch.zeros(1, 4), 2)
    with pytest.raises(ValueError, match="truncate"):
        decoder.truncate(5)


def test_unsupported_models_fall_back_to_transformers(caplog):
    from brecq_ext import fuse_projections_

    model = _model("qwen3", initializer_range=0.2)
    fused = _model("qwen3", initializer_range=0.2)
    fuse_projections_(fused)
    assert "is fused" in unsupported_reason(fused)
    with pytest.raises(UnsupportedModel, match="is fused"):
        CpuDecoder(fused)
    with caplog.at_level("INFO", logger="brecq"):
        out = generate(fused, _ids(5), 10, eos_token_id=[])
    assert "decoding through transformers" in caplog.text
    assert torch.equal(out, generate(model, _ids(5), 10, eos_token_id=[]))
    half = _model("llama", dtype=torch.float16, rules=None)
    assert "float16" in unsupported_reason(half)


def test_cli_generate_streams_the_greedy_continuation(tmp_path, capsys):
    from brecq.cli import main
    from transformers import AutoTokenizer

    path = require_shared(SHARED / "models" / "stories260k")
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = "Once upon a time"
    assert main(["generate", str(path), "--prompt", prompt, "--max-new-tokens", "12", "--dtype", "float32"]) == 0
    captured = capsys.readouterr()
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert captured.out.strip() == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert "brecq C++ runtime" in captured.err


def _first_argmax(values: torch.Tensor) -> int:
    values = values.float().contiguous()
    return cpu_kernels().first_argmax(values.data_ptr(), values.numel())


@pytest.mark.parametrize("case", [
    [1.0, 3.0, 2.0, 3.0],                                          # the first of equal maxima
    [-0.0, 0.0, -1.0],                                             # -0 equals +0
    [0.0, -0.0],
    [1.0, float("nan"), 5.0, float("nan")],                        # NaN above every number
    [1.0, -float("nan"), 5.0],                                     # a NaN with its sign bit set too
    [-float("inf"), -float("inf")],
    [float("inf"), 1e38, float("inf")],
    [-3.0],
    [-1e-45, -2e-45, 0.0, 1e-45],                                  # subnormals keep their order
], ids=["tie", "zeros", "zeros-rev", "nan", "neg-nan", "neg-inf", "inf", "one", "subnormal"])
def test_first_argmax_picks_as_torch_argmax(case):
    values = torch.tensor(case, dtype=torch.float32)
    assert _first_argmax(values) == int(values.argmax())


def test_first_argmax_of_nothing_and_of_random_rows():
    assert cpu_kernels().first_argmax(0, 0) == -1
    generator = torch.Generator().manual_seed(0)
    for n in (1, 7, 8192, 8193, 151936):
        values = torch.randn(n, generator=generator).to(torch.bfloat16).float()  # ties are likely
        assert _first_argmax(values) == int(values.argmax()), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_forward_greedy_picks_the_argmax_of_its_logits(dtype, threads):
    """forward_greedy's token is the argmax of the logits it leaves, which equal forward's. The
    vocabulary spans several of the shares the threads take, and its second half repeats the
    first (the lm_head's rows twice), so every largest logit has an equal twin in another share:
    the first must win whichever thread saw it."""
    vocab = 20000
    model = build_model(small_config("qwen3", vocab, initializer_range=0.2), seed=4, dtype=dtype).eval()
    with torch.no_grad():
        head = model.lm_head.weight
        head[vocab // 2:] = head[:vocab // 2]
    replace_linear_layers(model, STUDY_RULES)
    ids = torch.randint(0, vocab, (12,), generator=torch.Generator().manual_seed(5))
    plain, greedy = CpuDecoder(model, threads), CpuDecoder(model, threads)
    for i in range(ids.numel()):
        expected = plain.forward(ids[i:i + 1])
        token = greedy.forward_greedy(ids[i:i + 1])
        assert torch.equal(greedy.last_logits, expected)
        assert token == int(expected.argmax()) < vocab // 2
    with pytest.raises(ValueError, match=r"CpuDecoder\.forward_greedy: token_ids is empty"):
        greedy.forward_greedy([])
    # a prompt in several chunks: the token comes from the last one
    plain.reset(), greedy.reset()
    assert greedy.forward_greedy(ids) == int(plain.forward(ids).argmax())
