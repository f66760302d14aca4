"""torch.library.opcheck on every op: schema, fake (meta) implementation, autograd registration,
and AOT dispatch, on CPU and (when present) CUDA."""
import pytest
import torch

from brecq_ext import ops
from brecq_ext.layout import to_tile16


def _sample(device, bits=4, group_size=64, rows=5, in_features=172, out_features=7):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(out_features, in_features, generator=gen) * 0.05).to(device)
    scale, zero = ops.quant_params(w, bits, group_size)
    codes = ops.quantize(w, scale, zero, bits, group_size)
    packed = ops.pack(codes, bits, group_size)
    x = torch.randn(rows, in_features, generator=gen).to(device)
    v = torch.randn(out_features, in_features, generator=gen).to(device)
    bias = torch.randn(out_features, generator=gen).to(device)
    return dict(w=w, scale=scale, zero=zero, codes=codes, packed=packed, x=x, v=v, bias=bias)


def _cases(device):
    s = _sample(device)
    s6 = _sample(device, bits=6, rows=1)
    tiled = to_tile16(s["packed"], s["scale"], s["zero"], 4, 64, 172)
    tiled6 = to_tile16(s6["packed"], s6["scale"], s6["zero"], 6, 64, 172)
    s8 = _sample(device, bits=8, rows=2)
    tiled8 = to_tile16(s8["packed"], s8["scale"], s8["zero"], 8, 64, 172)
    return {
        "quant_params_minmax": (torch.ops.brecq.quant_params, (s["w"], 4, 64, 0)),
        "quant_params_mse": (torch.ops.brecq.quant_params, (s["w"], 4, 64, 20)),
        "quantize": (torch.ops.brecq.quantize, (s["w"], s["scale"], s["zero"], 4, 64)),
        "dequantize": (torch.ops.brecq.dequantize, (s["codes"], s["scale"], s["zero"], 64)),
        "fake_quantize": (torch.ops.brecq.fake_quantize,
                          (s["w"].clone().requires_grad_(True), s["scale"], s["zero"], 4, 64)),
        "adaround_forward": (torch.ops.brecq.adaround_forward,
                             (s["w"], s["v"].clone().requires_grad_(True), s["scale"], s["zero"], 4, 64)),
        "adaround_backward": (torch.ops.brecq.adaround_backward,
                              (torch.randn_like(s["w"]), s["w"], s["v"], s["scale"], s["zero"], 4, 64)),
        "adaround_regularizer": (torch.ops.brecq.adaround_regularizer,
                                 (s["v"].clone().requires_grad_(True), 12.0)),
        "pack": (torch.ops.brecq.pack, (s["codes"], 4, 64)),
        "unpack": (torch.ops.brecq.unpack, (s["packed"], 4, 64, 172)),
        "dequantize_packed_f32": (torch.ops.brecq.dequantize_packed,
                                  (s["packed"], s["scale"], s["zero"], 4, 64, 172, torch.float32)),
        "dequantize_packed_bf16": (torch.ops.brecq.dequantize_packed,
                                   (s["packed"], s["scale"], s["zero"], 4, 64, 172, torch.bfloat16)),
        "packed_matmul_gemm": (torch.ops.brecq.packed_matmul,
                               (s["x"].repeat(4, 1).requires_grad_(True), s["packed"], s["scale"], s["zero"],
                                s["bias"], 4, 64, 172)),
        "packed_matmul_gemv": (torch.ops.brecq.packed_matmul,
                               (s6["x"].to(torch.bfloat16), s6["packed"], s6["scale"], s6["zero"], None, 6,
                                64, 172)),
        "packed_matmul_gemv_grad": (torch.ops.brecq.packed_matmul,
                                    (s["x"].requires_grad_(True), s["packed"], s["scale"], s["zero"],
                                     s["bias"].clone().requires_grad_(True), 4, 64, 172)),
        "tile16_matmul_gemv_grad": (torch.ops.brecq.tile16_matmul,
                                    (s["x"].requires_grad_(True), *tiled, s["bias"].clone().requires_grad_(True),
                                     4, 64, 172, 7)),
        "tile16_matmul_gemv_bf16_w6": (torch.ops.brecq.tile16_matmul,
                                       (s6["x"].to(torch.bfloat16), *tiled6, None, 6, 64, 172, 7)),
        "tile16_matmul_gemm": (torch.ops.brecq.tile16_matmul,
                               (s["x"].repeat(4, 1), *tiled, s["bias"], 4, 64, 172, 7)),
        "tile16_matmul_gemv_w8": (torch.ops.brecq.tile16_matmul,
                                  (s8["x"].to(torch.bfloat16), *tiled8, s8["bias"], 8, 64, 172, 7)),
        "tile16_matmul_gemm_w6": (torch.ops.brecq.tile16_matmul,
                                  (s6["x"].repeat(12, 1), *tiled6, s6["bias"], 6, 64, 172, 7)),
        "decode_attention_gqa_bf16": (torch.ops.brecq.decode_attention,
                                      (*_attention_sample(device, torch.bfloat16, 3, 6, 2, 11, 40), None, 0.125)),
        "decode_attention_masked_f32": (torch.ops.brecq.decode_attention,
                                        (*_attention_sample(device, torch.float32, 2, 4, 4, 9, 32),
                                         (torch.arange(9) % 3 != 1).repeat(2, 1).to(device), 0.2)),
        "rms_norm_bf16": (torch.ops.brecq.rms_norm,
                          (torch.randn(3, 5, 40).to(device, torch.bfloat16),
                           torch.rand(40).to(device, torch.bfloat16), 1e-6)),
        "rms_norm_f32_strided": (torch.ops.brecq.rms_norm,
                                 (torch.randn(6, 72).to(device)[::2, 4:68], torch.rand(64).to(device), 1e-5)),
    }


def _attention_sample(device, dtype, batch, q_heads, kv_heads, kv_len, head_dim):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(batch, q_heads, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


CASE_NAMES = list(_cases("cpu"))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_opcheck(case, device):
    op, args = _cases(device)[case]
    torch.library.opcheck(op, args)


def test_every_op_is_covered():
    declared = {name for name in dir(torch.ops.brecq) if not name.startswith("_")} - {"name"}
    covered = {str(op).split(".")[-1] for op, _ in _cases("cpu").values()}  # "brecq.pack" -> "pack"
    assert len(declared) == 14
    assert declared <= covered, f"ops without opcheck: {sorted(declared - covered)}"
