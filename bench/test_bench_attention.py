"""Decode attention (one query token over a KV cache) at Qwen3-0.6B's heads: torch's
scaled_dot_product_attention, as transformers' "sdpa" calls it for a decode step, against
brecq_ext's kernel through the eager path that "brecq_sdpa" takes.

Each call reads the cache of the next of 28 layers (a Qwen3-0.6B decoder's count), so that at long
contexts the caches come from memory as in a real decode step.

    pytest bench/test_bench_attention.py --benchmark-json bench/results/attention.json -p no:cacheprovider
    python bench/summarize.py bench/results/attention.json
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import brecq_ext
from brecq_ext.attention import decode_attention_forward

LAYERS = 28
Q_HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128
KV_LENS = [48, 512, 2048]
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}
KINDS = ["sdpa", "brecq"]

_caches: dict = {}


def _layer_caches(kv_len: int, dtype: torch.dtype):
    key = (kv_len, dtype)
    if key not in _caches:
        _caches.clear()
        gen = torch.Generator().manual_seed(0)
        shape = (1, KV_HEADS, kv_len, HEAD_DIM)
        _caches[key] = [(torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
                        for _ in range(LAYERS)]
    return _caches[key]


CASES = [(kv_len, dtype, kind) for dtype in DTYPES for kv_len in KV_LENS for kind in KINDS]


@pytest.mark.parametrize("kv_len,dtype_name,kind", CASES, ids=[f"L{n}-{d}-{k}" for n, d, k in CASES])
def test_decode_attention(benchmark, kv_len, dtype_name, kind):
    dtype = DTYPES[dtype_name]
    caches = _layer_caches(kv_len, dtype)
    query = torch.randn(1, Q_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1)).to(dtype)
    scale = HEAD_DIM ** -0.5
    state = {"i": 0}
    if kind == "sdpa":
        query4 = query.unsqueeze(2)  # [batch, heads, 1 token, head_dim]

        def call():
            state["i"] += 1
            k, v = caches[state["i"] % LAYERS]
            return F.scaled_dot_product_attention(query4, k, v, scale=scale, enable_gqa=True)
    else:
        def call():
            state["i"] += 1
            k, v = caches[state["i"] % LAYERS]
            return decode_attention_forward(query, k, v, None, scale)

    benchmark.extra_info.update(kind=f"attention_{kind}", kv_len=kv_len, dtype=dtype_name,
                                cache_bytes=2 * KV_HEADS * kv_len * HEAD_DIM * caches[0][0].element_size(),
                                threads=torch.get_num_threads(), isa=brecq_ext.cpu_isa(), torch=torch.__version__)
    with torch.inference_mode():
        benchmark.pedantic(call, rounds=200 if kv_len <= 512 else 60, iterations=1, warmup_rounds=3)
