"""brecq_ext.attention (torch.ops.brecq.decode_attention) against its reference and torch's SDPA,
and the "brecq_sdpa" attention of transformers models (brecq.attention)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from brecq.measurement.measure import _cache_keyword
from brecq.models import build_model, qwen3_config

from brecq_ext import attention, reference
from brecq_ext._extension import cpu_kernels

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.bfloat16, id="bf16")]
# (batch, q_heads, kv_heads): Qwen3-0.6B's 16/8, an uneven group of 3, plain multi-head, one kv head
HEADS = [pytest.param((1, 16, 8), id="b1-h16-kv8"), pytest.param((3, 6, 2), id="b3-h6-kv2"),
         pytest.param((2, 4, 4), id="b2-h4-kv4"), pytest.param((1, 12, 1), id="b1-h12-kv1")]
KV_LENS = [1, 7, 48, 301]
HEAD_DIMS = [36, 128]
MASKS = ["none", "random", "prefix"]


def _tolerance(dtype):
    # float32: summation order and the kernel's exp differ from torch's by ulps; bfloat16: one ulp
    # of the output after rounding
    return {"rtol": 1e-5, "atol": 1e-6} if dtype is torch.float32 else {"rtol": 2**-7, "atol": 2**-9}


def _inputs(batch, q_heads, kv_heads, kv_len, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 256, 48], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("kv_len", [1, 15, 16, 17, 300, 2049], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8, 16, 17], ids=lambda g: f"g{g}")
def test_bfloat16_cache_kernel_on_every_isa(isa, group, kv_len, head_dim):
    """bfloat16 without a mask is where the AVX-512 kernel (VDPBF16PS scores, register accumulators
    for the common shapes) and, on the avx2 path, the AVX2 one (even/odd halves, FMA) take over; head
    sizes not a multiple of 32 and groups over 16 stay on the portable one. Every ISA against the reference, in the decoder's shape: one sequence, a strided
    cache with room beyond the filled positions."""
    kv_heads = 2
    q, k, v = _inputs(1, kv_heads * group, kv_heads, kv_len + 5, head_dim, torch.bfloat16, seed=kv_len)
    k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # strided views, as the decoder's cache
    scale = head_dim ** -0.5
    out = attention.decode_attention(q, k, v, None, scale)
    expected = reference.decode_attention(q, k, v, None, scale)
    torch.testing.assert_close(out.float(), expected.float(), **_tolerance(torch.bfloat16))


def _mask(kind, batch, kv_len, seed=0):
    if kind == "none":
        return None
    if kind == "prefix":  # a static cache: the first positions hold tokens, the tail is unused
        lengths = torch.tensor([max(1, kv_len - 3 * b) for b in range(batch)])
        return torch.arange(kv_len)[None, :] < lengths[:, None]
    mask = torch.rand(batch, kv_len, generator=torch.Generator().manual_seed(seed)) > 0.4
    mask[:, -1] = True  # the current token always sees itself
    return mask


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("kv_len", KV_LENS, ids=lambda n: f"L{n}")
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_against_reference(dtype, heads, kv_len, head_dim, mask_kind):
    batch, q_heads, kv_heads = heads
    q, k, v = _inputs(batch, q_heads, kv_heads, kv_len, head_dim, dtype)
    mask = _mask(mask_kind, batch, kv_len)
    scale = head_dim ** -0.5
    out = attention.decode_attention(q, k, v, mask, scale)
    expected = reference.decode_attention(q, k, v, mask, scale)
    assert out.dtype == dtype and out.shape == (batch, q_heads, head_dim)
    torch.testing.assert_close(out.float(), expected.float(), **_tolerance(dtype))
    fast = attention.decode_attention_forward(q, k, v, mask, scale)  # the eager path models take
    assert torch.equal(fast, out)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("heads", HEADS)
def test_reference_is_torch_sdpa_with_grouped_heads(heads, mask_kind):
    """The head pairing (query head h reads kv head h // group) and the masking are torch's."""
    batch, q_heads, kv_heads = heads
    q, k, v = _inputs(batch, q_heads, kv_heads, 23, 32, torch.float64)
    mask = _mask(mask_kind, batch, 23)
    group = q_heads // kv_heads
    sdpa = F.scaled_dot_product_attention(q.unsqueeze(2), k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          attn_mask=None if mask is None else mask[:, None, None, :],
                                          scale=0.3).squeeze(2).float()
    q, k, v = q.float(), k.float(), v.float()  # the reference and the kernel compute in float32
    torch.testing.assert_close(reference.decode_attention(q, k, v, mask, 0.3), sdpa, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention.decode_attention(q, k, v, mask, 0.3), sdpa, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_caches(dtype):
    """A static cache's prefix, a [batch, len, heads, dim] cache seen as [batch, heads, len, dim], and
    a key whose head_dim is not contiguous (copied first) all give the contiguous result."""
    q, k, v = _inputs(2, 8, 4, 19, 64, dtype)
    expected = attention.decode_attention(q, k, v, None, 0.125)
    big_k = torch.zeros(2, 4, 40, 64, dtype=dtype)
    big_v = torch.zeros(2, 4, 40, 64, dtype=dtype)
    big_k[:, :, :19], big_v[:, :, :19] = k, v
    prefix_k, prefix_v = big_k[:, :, :19], big_v[:, :, :19]
    assert not prefix_k.is_contiguous()
    assert torch.equal(attention.decode_attention(q, prefix_k, prefix_v, None, 0.125), expected)
    seq_major_k, seq_major_v = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(attention.decode_attention(q, seq_major_k, seq_major_v, None, 0.125), expected)
    dim_strided_k = k.transpose(2, 3).contiguous().transpose(2, 3)
    assert dim_strided_k.stride(3) != 1
    assert torch.equal(attention.decode_attention(q, dim_strided_k, v, None, 0.125), expected)
    strided_mask = torch.ones(2, 38, dtype=torch.bool)[:, ::2]
    assert torch.equal(attention.decode_attention(q, k, v, strided_mask, 0.125), expected)


def test_no_visible_key_gives_zeros():
    q, k, v = _inputs(2, 4, 2, 5, 16, torch.float32)
    mask = torch.tensor([[False] * 5, [True, False, True, False, False]])
    out = attention.decode_attention(q, k, v, mask, 0.25)
    assert torch.equal(out[0], torch.zeros(4, 16))
    torch.testing.assert_close(out, reference.decode_attention(q, k, v, mask, 0.25))
    assert torch.isfinite(out).all()


def test_threads_do_not_change_the_result():
    q, k, v = _inputs(2, 16, 8, 100, 128, torch.bfloat16)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attention.decode_attention(q, k, v, None, 0.1)
        torch.set_num_threads(max(2, previous))
        many = attention.decode_attention(q, k, v, None, 0.1)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, many)


def test_large_groups_and_float16_run_the_reference():
    q, k, v = _inputs(1, attention.MAX_CPU_GROUP + 1, 1, 9, 16, torch.float32)
    assert torch.equal(attention.decode_attention(q, k, v, None, 0.5), reference.decode_attention(q, k, v, None, 0.5))
    q16, k16, v16 = (t.half() for t in _inputs(1, 4, 2, 9, 16, torch.float32))
    assert torch.equal(attention.decode_attention(q16, k16, v16, None, 0.5),
                       reference.decode_attention(q16, k16, v16, None, 0.5))


def test_group_limit_matches_the_compiled_kernel():
    kernels = cpu_kernels()
    assert kernels is not None
    assert kernels.MAX_DECODE_GROUP == attention.MAX_CPU_GROUP


def _bad_inputs():
    q, k, v = _inputs(2, 4, 2, 5, 8, torch.float32)
    mask = torch.ones(2, 5, dtype=torch.bool)
    return [
        pytest.param((q.half(), k, v, None, 0.5), TypeError, "key must have dtype float16", id="key-dtype"),
        pytest.param((q, k, v.double(), None, 0.5), TypeError, "value must have dtype float32", id="value-dtype"),
        pytest.param((q[0], k, v, None, 0.5), ValueError, "query must be 3-D", id="query-ndim"),
        pytest.param((q, k[:, :, :, :4], v, None, 0.5), ValueError, "key must be", id="head-dim"),
        pytest.param((q, k[:1], v[:1], None, 0.5), ValueError, "key must be", id="batch"),
        pytest.param((q, k, v[:, :, :4], None, 0.5), ValueError, "value must have key's shape", id="value-shape"),
        pytest.param((q[:, :3], k, v, None, 0.5), ValueError, "multiple of key's heads", id="heads"),
        pytest.param((q, k[:, :, :0], v[:, :, :0], None, 0.5), ValueError, "at least one cached position",
                     id="empty-cache"),
        pytest.param((q, k, v, mask.int(), 0.5), TypeError, "key_mask must have dtype bool", id="mask-dtype"),
        pytest.param((q, k, v, mask[:, :4], 0.5), ValueError, "key_mask must be", id="mask-shape"),
        pytest.param((q, k, v, None, float("nan")), ValueError, "scale must be a finite number", id="scale"),
    ]


@pytest.mark.parametrize("args,error,message", _bad_inputs())
@pytest.mark.parametrize("entry", ["op", "forward"])
def test_bad_input_names_the_argument(entry, args, error, message):
    call = attention.decode_attention if entry == "op" else attention.decode_attention_forward
    with pytest.raises(error, match=message):
        call(*args)


def test_compiles_without_graph_breaks():
    q, k, v = _inputs(1, 8, 4, 12, 32, torch.float32)
    mask = torch.ones(1, 12, dtype=torch.bool)

    def step(q, k, v, mask):
        return attention.decode_attention_forward(q * 2, k, v, mask, 0.2) + 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, mask), step(q, k, v, mask))


# ---- transformers models ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_qwen3():
    config = qwen3_config("0.6b", num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=16, vocab_size=500)
    return build_model(config, seed=0).eval()


def _greedy_steps(model, ids, cache, steps, attention_mask=None):
    keyword = _cache_keyword(model)
    out = model(ids, attention_mask=attention_mask, use_cache=True, **{keyword: cache})
    token, logits = out.logits[:, -1:].argmax(-1), []
    for _ in range(steps):
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
        out = model(token, attention_mask=attention_mask, use_cache=True, **{keyword: cache})
        token = out.logits[:, -1:].argmax(-1)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static", "padded"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_model_decode_matches_sdpa(tiny_qwen3, monkeypatch, dtype, cache_kind):
    import brecq.attention
    from transformers import DynamicCache, StaticCache

    sdpa_model = copy.deepcopy(tiny_qwen3).to(dtype)
    brecq_model = brecq.attention.use_decode_attention(copy.deepcopy(sdpa_model))
    assert brecq_model.config._attn_implementation == brecq.attention.ATTENTION
    kernel_calls = []
    real = brecq.attention.decode_attention_forward
    monkeypatch.setattr(brecq.attention, "decode_attention_forward",
                        lambda *args: kernel_calls.append(args[3]) or real(*args))
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(3))
    padding = None
    if cache_kind == "padded":
        padding = torch.ones(2, 9, dtype=torch.long)
        padding[0, :4] = 0  # left padding: the kernel gets a key mask
    results = []
    with torch.inference_mode():
        for model in (sdpa_model, brecq_model):
            if cache_kind == "static":
                cache = StaticCache(config=model.config, max_cache_len=24)
            else:
                cache = DynamicCache(config=model.config)
            results.append(_greedy_steps(model, ids, cache, 5, padding))
    layers = tiny_qwen3.config.num_hidden_layers
    assert len(kernel_calls) == 5 * layers  # every decode step, no prompt
    assert all((mask is None) == (cache_kind == "dynamic") for mask in kernel_calls)
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype is torch.float32 else {"rtol": 0.05, "atol": 0.05}
    torch.testing.assert_close(results[1].float(), results[0].float(), **tolerance)


def test_generate_gives_the_sdpa_tokens(tiny_qwen3):
    import brecq.attention

    brecq_model = brecq.attention.use_decode_attention(copy.deepcopy(tiny_qwen3))
    ids = torch.randint(0, 500, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = tiny_qwen3.generate(ids, max_new_tokens=8, do_sample=False)
        got = brecq_model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)


def test_registration_is_idempotent():
    import brecq.attention
    from transformers import AttentionInterface

    assert brecq.attention.register_attention() == brecq.attention.register_attention() == "brecq_sdpa"
    assert AttentionInterface()["brecq_sdpa"] is brecq.attention.brecq_sdpa_attention_forward
