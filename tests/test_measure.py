"""Decode measurement with a static KV cache (and CUDA graph replay on a GPU): it must decode the
same tokens as plain greedy decoding with the model's dynamic cache, or its timings mean nothing."""
import pytest
import torch

from brecq.measurement.measure import StaticDecoder, _cache_keyword, _cache_of, static_decode_latency
from brecq.models import build_model, qwen3_config


def _greedy_dynamic(model, ids, steps):
    tokens, keyword = [], _cache_keyword(model)
    out = model(ids, use_cache=True)
    for _ in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(int(token))
        out = model(token, use_cache=True, **{keyword: _cache_of(out)})
    return tokens


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
@torch.no_grad()
def test_static_decoder_matches_dynamic_greedy_decoding(device):
    # A wider initialisation than the default, so that greedy decoding does not repeat one token.
    model = build_model(qwen3_config("tiny", initializer_range=0.1), seed=0).to(device).eval()
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0)).to(device)
    expected = _greedy_dynamic(model, ids, 10)
    assert len(set(expected)) > 1  # a degenerate sequence would not test the positions
    for use_graph in ([False, True] if device == "cuda" else [False]):
        decoder = StaticDecoder(model, max_tokens=32, use_graph=use_graph)
        token, got = decoder.prefill(ids), []
        for _ in range(10):
            got.append(int(token))
            token = decoder.step(token)
        assert got == expected, f"use_graph={use_graph}"


@pytest.mark.parametrize("attention", ["sdpa", "brecq_sdpa"])
@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "w4w6"])
@torch.no_grad()
def test_compiled_static_decoder_matches_too(quantized, attention):
    # The torch.compile'd decode step (as measured on GPUs) decodes the same tokens, with packed
    # layers too; the aot_eager backend traces the step as inductor would, without generating code.
    model = build_model(qwen3_config("tiny", initializer_range=0.1), seed=0).eval()
    if quantized:
        from brecq.quantization.quantize import quantize
        from brecq.quantization.recipe import Method, get_recipe

        quantize(model, get_recipe("w4g64_mix_attn6", Method.RTN), show_progress=False)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    expected = _greedy_dynamic(model, ids, 6)  # with transformers' sdpa
    if attention == "brecq_sdpa":  # the decode-attention op traced into the compiled step
        from brecq.attention import use_decode_attention

        use_decode_attention(model)
    decoder = StaticDecoder(model, max_tokens=32, use_graph=False, compile_backend="aot_eager")
    token, got = decoder.prefill(ids), []
    for _ in range(6):
        got.append(int(token))
        token = decoder.step(token)
    assert got == expected


def test_static_decode_latency_reports_positive_times():
    model = build_model(qwen3_config("tiny"), seed=0).eval()
    report = static_decode_latency(model, prompt_tokens=8, decode_tokens=4, use_graph=False, repeats=1)
    assert report.decode_ms_per_token_median > 0 and report.prefill_ms > 0
    assert report.tokens_per_second == pytest.approx(1e3 / report.decode_ms_per_token_median)


def test_cuda_graph_needs_a_cuda_model():
    model = build_model(qwen3_config("tiny"), seed=0)
    with pytest.raises(Exception, match="CUDA graphs need the model on a CUDA device"):
        StaticDecoder(model, max_tokens=8, use_graph=True)


def test_paired_latency_times_every_model_on_the_same_steps():
    from brecq.measurement.measure import paired_latency

    models = {"a": build_model(qwen3_config("tiny"), seed=0).eval(), "b": build_model(qwen3_config("tiny"), seed=1).eval()}
    reports = paired_latency(models, prompt_tokens=8, decode_tokens=3, repeats=2)
    assert set(reports) == {"a", "b"}
    for report in reports.values():
        assert report.decode_ms_per_token_median > 0 and report.prefill_ms > 0
        assert report.decode_tokens == 3 and report.repeats == 2


def test_speed_table_times_the_layout_quantlinear_uses():
    from brecq_ext.layout import preferred_layout

    from brecq.measurement.speed import time_linear_shapes

    timings = time_linear_shapes({"tiny": (128, 48)}, rows=1, footprint_bytes=1 << 16, repeats=3)
    (timing,) = timings
    assert timing.layouts == {bits: preferred_layout("cpu", bits, 64) for bits in (4, 6)}
    assert timing.dense_bf16_us > 0 and all(us > 0 for us in timing.packed_us.values())


def test_prefill_computes_the_last_position_logits_only():
    """As generate() does: timing the lm_head over the whole prompt would inflate prefill."""
    from brecq.measurement.measure import paired_latency

    model = build_model(qwen3_config("tiny"), seed=0).eval()
    positions = []
    model.lm_head.register_forward_hook(lambda module, args, out: positions.append(args[0].shape[1]))
    paired_latency({"m": model}, prompt_tokens=8, decode_tokens=2, repeats=1, warmup=0)
    assert positions == [1, 1, 1]  # the prefill, then two steps
    positions.clear()
    decoder = StaticDecoder(model, max_tokens=16, use_graph=False)
    decoder.step(decoder.prefill(torch.zeros(1, 8, dtype=torch.long)))
    assert positions == [1, 1]


def test_peak_rss_of_a_child_is_its_own_not_its_parents(tmp_path):
    """ru_maxrss survives exec on Linux; a child of a large process must still report its own peak."""
    import subprocess
    import sys

    from brecq.measurement.measure import peak_rss_mib

    ballast = torch.ones(400 * 2**20 // 4)  # 400 MiB held by this process while the child runs
    assert peak_rss_mib() > 400
    done = subprocess.run([sys.executable, "-c", "from brecq.measurement.measure import peak_rss_mib; print(peak_rss_mib())"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, check=True)
    assert float(done.stdout.strip()) < 300, done.stdout
    del ballast
