"""Exports: GGUF blocks read back by llama.cpp's own Python package (``gguf``) and compressed-tensors
layers decompressed by that package, each against brecq's own dequantization."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from brecq.export import (
    Fallback,
    export_compressed_tensors,
    export_gguf,
    export_gguf_full_precision,
    read_checkpoint,
)
from brecq.export.gguf_blocks import M_ROUNDING_STEPS_PER_ZERO, pack_layer
from brecq.export.to_gguf import UnsupportedModel, _rope_permutation
from brecq.io import CorruptCheckpoint
from conftest import DATA, STORIES260K, require_shared

from brecq_ext import reference

gguf = pytest.importorskip("gguf")


def random_layer(out_features, in_features, bits, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = -(-in_features // group_size)
    codes = torch.randint(0, 2 ** bits, (out_features, in_features), generator=g, dtype=torch.int32).to(torch.uint8)
    zero = torch.randint(0, 2 ** bits, (out_features, groups), generator=g, dtype=torch.int32).to(torch.uint8)
    # Scales over float16's whole useful range: subnormal, tiny, ordinary and large.
    exponents = torch.randint(-26, 4, (out_features, groups), generator=g).float()
    scale = (torch.rand(out_features, groups, generator=g) + 1).mul(2.0 ** exponents).clamp(2 ** -24, 60000).half()
    return codes, scale, zero


def gguf_dequantized(packed):
    qtype = getattr(gguf.GGMLQuantizationType, packed.ggml_type)
    if packed.ggml_type in ("F32", "F16"):
        return packed.data.astype(np.float32)
    return gguf.quants.dequantize(packed.data, qtype)


def steps_off(theirs, codes, scale, zero, group_size):
    ours = reference.dequantize(codes, scale, zero, group_size)
    s = scale.float().repeat_interleave(group_size, 1)[:, :codes.shape[1]]
    return (torch.from_numpy(np.array(theirs, dtype=np.float32)) - ours).abs() / s, ours


SHAPES = [(1, 64), (7, 96), (33, 256), (16, 128)]


@pytest.mark.parametrize("group_size", [32, 64, 128], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", range(2, 9), ids=lambda b: f"w{b}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_blocks_read_back_by_gguf_dequantizers(shape, bits, group_size):
    out_features, in_features = shape
    codes, scale, zero = random_layer(out_features, in_features, bits, group_size, seed=bits * 100 + group_size)
    packed = pack_layer(codes, scale, zero, bits, group_size)
    expected = {2: "Q4_1", 3: "Q4_1", 4: "Q4_1", 5: "Q5_1"}.get(bits, "Q8_0")
    assert packed.ggml_type == expected
    assert packed.data.dtype == np.uint8 and packed.data.shape[0] == out_features
    theirs = gguf_dequantized(packed)
    assert theirs.shape == (out_features, in_features)
    steps, ours = steps_off(theirs, codes, scale, zero, group_size)
    # The exporter's own error figure is what gguf's dequantizers see.
    assert float(steps.max()) == pytest.approx(packed.max_error_steps, rel=1e-4, abs=1e-9)
    if bits in (6, 7):
        assert torch.equal(torch.from_numpy(theirs), ours), "Q8_0 holds 6- and 7-bit codes exactly"
    elif bits == 8:
        z = zero.float().repeat_interleave(group_size, 1)[:, :in_features]
        centred = codes.float() - z
        blocks_fit = ((centred >= -128) & (centred <= 127)).view(out_features, -1, 32).all(-1)
        exact = torch.from_numpy(theirs).view(out_features, -1, 32) == ours.view(out_features, -1, 32)
        assert exact.all(-1)[blocks_fit].all(), "8-bit blocks whose q - z fits int8 are exact"
        assert packed.requantized_blocks == int((~blocks_fit).sum())
        assert float(steps.max()) <= 1.0
    else:
        # Q4_1 / Q5_1: the float16 rounding of m = -s*z, at most z * 2^-11 steps (plus float32 rounding).
        z = zero.float().repeat_interleave(group_size, 1)[:, :in_features]
        assert (steps <= z * M_ROUNDING_STEPS_PER_ZERO + 1e-5).all()


def test_zero_point_zero_is_exact_in_q4_1():
    codes, scale, _ = random_layer(4, 64, 4, 64)
    zero = torch.zeros(4, 1, dtype=torch.uint8)
    packed = pack_layer(codes, scale, zero, 4, 64)
    assert packed.max_error_steps == 0.0
    theirs = torch.from_numpy(gguf_dequantized(packed))
    assert torch.equal(theirs, reference.dequantize(codes, scale, zero, 64))


@pytest.mark.parametrize("fallback", list(Fallback), ids=lambda f: f.value)
@pytest.mark.parametrize("in_features,group_size", [(172, 64), (128, 16), (40, 8)], ids=["in172", "g16", "in40g8"])
def test_layers_no_block_holds_fall_back(in_features, group_size, fallback):
    codes, scale, zero = random_layer(5, in_features, 4, group_size)
    packed = pack_layer(codes, scale, zero, 4, group_size, fallback)
    assert packed.ggml_type == fallback.name and packed.reason
    ours = reference.dequantize(codes, scale, zero, group_size)
    theirs = torch.from_numpy(gguf_dequantized(packed))
    if fallback is Fallback.F32:
        assert torch.equal(theirs, ours) and packed.exact
    else:
        assert torch.equal(theirs, ours.half().float())
        s = scale.float().repeat_interleave(group_size, 1)[:, :in_features]
        assert float(((theirs - ours).abs() / s).max()) == pytest.approx(packed.max_error_steps)


def test_exact_8bit_sends_a_layer_q8_0_cannot_hold_to_the_fallback():
    codes = torch.tensor([[255] * 32, [3] * 32], dtype=torch.uint8)
    scale = torch.full((2, 1), 0.01).half()
    zero = torch.zeros(2, 1, dtype=torch.uint8)  # q - z = 255: beyond int8
    assert pack_layer(codes, scale, zero, 8, 32).ggml_type == "Q8_0"
    exact = pack_layer(codes, scale, zero, 8, 32, exact_8bit=True)
    assert exact.ggml_type == "F32" and exact.exact and "exact_8bit" in exact.reason
    codes[0] = 100
    assert pack_layer(codes, scale, zero, 8, 32, exact_8bit=True).ggml_type == "Q8_0", "fits: stays Q8_0"


def test_a_minimum_beyond_float16_falls_back():
    codes, _, _ = random_layer(2, 64, 4, 64)
    scale = torch.full((2, 1), 60000.0).half()
    zero = torch.full((2, 1), 15, dtype=torch.uint8)  # -s*z = -900000: no float16 holds it
    packed = pack_layer(codes, scale, zero, 4, 64)
    assert packed.ggml_type == "F32" and "float16" in packed.reason


@pytest.mark.parametrize("values,expected", [("bf16", "BF16"), ("f16", "F16"), ("f32", "F32")])
def test_dense_tensors_take_the_narrowest_exact_type(values, expected):
    from brecq.export.to_gguf import _dense_array

    t = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    t = {"bf16": t.bfloat16().float(), "f16": (t * 1e-3).half().float(), "f32": t}[values]
    array, kind = _dense_array(t)
    assert kind == expected
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    back = gguf.quants.dequantize(array, qtype) if kind == "BF16" else array.astype(np.float32)
    assert torch.equal(torch.from_numpy(np.array(back, dtype=np.float32)), t), "lossless"
    assert _dense_array(t[0])[1] == "F32", "1-D tensors stay F32"


def test_rope_permutation_matches_interleaving():
    # llama.cpp's NORM rotary pairs (2i, 2i+1); Hugging Face's rotate-half pairs (i, i + d/2).
    order = _rope_permutation(8, 2)
    assert order.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


# -- whole models -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stories_quantized(tmp_path_factory):
    from brecq import Method, get_recipe, quantize_pretrained

    model = require_shared(STORIES260K)
    out = tmp_path_factory.mktemp("stories") / "rtn"
    quantize_pretrained(str(model), str(out), get_recipe("w4g64_mix_attn6", Method.RTN), show_progress=False)
    return out


ARCHITECTURES = {"qwen3": "QWEN3", "qwen2": "QWEN2", "llama": "LLAMA", "mistral": "LLAMA"}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch_quantized(request, tmp_path_factory):
    """A seeded model of each supported architecture with a byte-level BPE tokenizer, quantized W6
    attention / W4 MLP / W8 head (untied)."""
    from brecq import Method, get_recipe, quantize_pretrained
    from brecq.models import build_model, byte_level_bpe_tokenizer, small_config

    root = tmp_path_factory.mktemp(request.param)
    texts = [f"Story {i}: the {c} cat sat on the mat and said {i * 7} words." for i, c in
             enumerate(["red", "blue", "green", "small", "big"] * 40)]
    tokenizer = byte_level_bpe_tokenizer(texts, 400, root / "fp")
    config = small_config(request.param, 448, hidden_size=128, intermediate_size=192, head_dim=32,
                          tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id)
    build_model(config, seed=3).save_pretrained(str(root / "fp"))
    out = root / "rtn"
    quantize_pretrained(str(root / "fp"), str(out), get_recipe("w4g64_mix_attn6_head8", Method.RTN),
                        show_progress=False)
    return request.param, out


def read_back(path):
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}
    return fields, tensors


def check_every_tensor(checkpoint, tensors, arch, heads, kv_heads):
    """Every GGUF tensor against brecq: exact for F32/Q8_0, within the Q4_1/Q5_1 bound."""
    name_map = gguf.get_tensor_name_map(arch, int(checkpoint.config["num_hidden_layers"]))
    seen = set()
    for name, layer in checkpoint.layers.items():
        gguf_name = name_map.get_name(name + ".weight", try_suffixes=(".weight",))
        kind, theirs = tensors[gguf_name]
        seen.add(gguf_name)
        codes, scale, zero, bias = layer.codes, layer.scale, layer.zero, layer.bias
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("q_proj", "k_proj")):
            order = _rope_permutation(layer.out_features, heads if name.endswith("q_proj") else kv_heads)
            codes, scale, zero = codes[order], scale[order], zero[order]
            bias = bias[order] if bias is not None else None
        if bias is not None:
            bias_name = gguf_name[: -len(".weight")] + ".bias"
            seen.add(bias_name)
            assert torch.equal(torch.from_numpy(np.array(tensors[bias_name][1])), bias.float()), bias_name
        steps, ours = steps_off(theirs, codes, scale, zero, layer.group_size)
        if kind in ("Q8_0", "F32") and layer.bits < 8:
            assert torch.equal(torch.from_numpy(np.array(theirs)), ours), name
        elif kind in ("Q4_1", "Q5_1"):
            z = zero.float().repeat_interleave(layer.group_size, 1)[:, :layer.in_features]
            assert (steps <= z * M_ROUNDING_STEPS_PER_ZERO + 1e-5).all(), name
        else:
            assert float(steps.max()) <= 1.0, name
    for name, tensor in checkpoint.tensors.items():
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        kind, theirs = tensors[gguf_name]
        seen.add(gguf_name)
        theirs = torch.from_numpy(np.array(theirs, dtype=np.float32)).reshape(tensor.shape)
        assert torch.equal(theirs, tensor.float()), name
    assert seen == set(tensors), f"unexpected tensors {set(tensors) - seen}"


def test_stories260k_exports_exactly(stories_quantized, tmp_path):
    path = tmp_path / "stories.gguf"
    report = export_gguf(stories_quantized, path)
    fields, tensors = read_back(path)
    checkpoint = read_checkpoint(stories_quantized)
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 5
    assert fields["llama.attention.head_count"] == 8 and fields["llama.attention.head_count_kv"] == 4
    assert fields["tokenizer.ggml.model"] == "llama"
    tokenizer = json.loads((stories_quantized / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    assert fields["tokenizer.ggml.tokens"] == [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert "output.weight" not in tensors, "tied embeddings: llama.cpp reuses token_embd"
    check_every_tensor(checkpoint, tensors, gguf.MODEL_ARCH.LLAMA, 8, 4)
    kinds = {row["hf_name"]: row["ggml_type"] for row in report.rows}
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == "Q8_0"
    assert kinds["model.layers.0.mlp.gate_proj.weight"] == "Q4_1"
    assert kinds["model.layers.0.mlp.down_proj.weight"] == "F32", "172 inputs: no 32-block type holds them"
    assert 0 < report.max_error_steps() <= 15 * M_ROUNDING_STEPS_PER_ZERO


def test_full_precision_model_exports_exactly(tmp_path):
    """An unquantized model (the input of llama.cpp's own quantizer): every tensor exact, q/k rows in
    llama.cpp's rotary order; llama.cpp, where installed, computes the model's logits from it."""
    from transformers import AutoModelForCausalLM

    source = require_shared(STORIES260K)
    path = tmp_path / "fp.gguf"
    report = export_gguf_full_precision(source, path)
    fields, tensors = read_back(path)
    assert fields["general.architecture"] == "llama" and "general.quantized_by" not in fields
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32  # stories260k is float32
    model = AutoModelForCausalLM.from_pretrained(source)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 5)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    assert {name_map.get_name(k, try_suffixes=(".weight",)) for k in state} == set(tensors)
    for name, tensor in state.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = tensor[_rope_permutation(tensor.shape[0], 8 if "q_proj" in name else 4)]
        kind, theirs = tensors[name_map.get_name(name, try_suffixes=(".weight",))]
        assert kind == "F32" and torch.equal(torch.from_numpy(np.array(theirs)).reshape(tensor.shape), tensor), name
    assert report.quantized_rows() == []
    with pytest.raises(ValueError, match="quantized"):
        export_gguf_full_precision(_quantized_folder(tmp_path), tmp_path / "x.gguf")
    if importlib.util.find_spec("llama_cpp") is None:
        return
    from brecq.export.llamacpp import compare_logits, open_llama
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    sequences = [tokenizer("Once upon a time there was a little dog who liked to run")["input_ids"]]
    agreement = compare_logits(model, open_llama(path, extra_buffer_types=False), sequences)
    assert agreement.top1 == 1.0 and agreement.mean_kl <= 1e-3, agreement


def _stub_quantizer(tmp_path, body):
    stub = tmp_path / "llama-quantize"
    stub.write_text("#!/bin/sh\n" + body)
    stub.chmod(0o755)
    return stub


def test_llama_quantize_binary_gets_llama_cpp_arguments(tmp_path):
    """Without llama-cpp-python, a llama-quantize built from source makes the files: it is called as
    ``llama-quantize IN OUT FTYPE [THREADS]`` with the LLAMA_FTYPE_MOSTLY_* number."""
    from brecq.export.llamacpp import llama_quantize

    stub = _stub_quantizer(tmp_path, 'echo "$@" > "$2"\n')
    llama_quantize(tmp_path / "in.gguf", tmp_path / "a.gguf", 15, 2, binary=stub)
    assert (tmp_path / "a.gguf").read_text().split() == [str(tmp_path / "in.gguf"), str(tmp_path / "a.gguf"),
                                                         "15", "2"]
    llama_quantize(tmp_path / "in.gguf", tmp_path / "b.gguf", 2, binary=stub)
    assert (tmp_path / "b.gguf").read_text().split()[2:] == ["2"], "threads 0: llama.cpp's own default"
    failing = _stub_quantizer(tmp_path, 'echo "failed to read $1" >&2\nexit 3\n')
    with pytest.raises(RuntimeError, match="exit code 3: failed to read"):
        llama_quantize(tmp_path / "in.gguf", tmp_path / "d.gguf", 7, binary=failing)


@pytest.mark.skipif(not os.environ.get("BRECQ_LLAMA_CPP_SOURCE"),
                    reason="needs a llama.cpp tree with llama-quantize built (bench/llama_cpp_source.sh --llama-bench)")
def test_llama_quantize_binary_makes_a_q8_0_file(tmp_path):
    """The real llama-quantize from a source build turns the full-precision export into Q8_0."""
    from brecq.export.llamacpp import llama_quantize

    binary = Path(os.environ["BRECQ_LLAMA_CPP_SOURCE"]) / "build" / "bin" / "llama-quantize"
    if not binary.is_file():
        pytest.skip(f"{binary} is not built")
    source = tmp_path / "fp.gguf"
    export_gguf_full_precision(require_shared(STORIES260K), source)
    llama_quantize(source, tmp_path / "q8.gguf", 7, 1, binary=binary)
    fields, tensors = read_back(tmp_path / "q8.gguf")
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert tensors["blk.0.attn_q.weight"][0] == "Q8_0"
    with pytest.raises(RuntimeError, match="invalid ftype"):
        llama_quantize(source, tmp_path / "bad.gguf", 99, 1, binary=binary)


def _quantized_folder(tmp_path):
    from brecq import Method, get_recipe, quantize_pretrained

    out = tmp_path / "q"
    quantize_pretrained(str(require_shared(STORIES260K)), str(out), get_recipe("w8g64", Method.RTN),
                        show_progress=False)
    return out


def test_each_architecture_exports_exactly(arch_quantized, tmp_path):
    model_type, quantized = arch_quantized
    path = tmp_path / "model.gguf"
    report = export_gguf(quantized, path)
    fields, tensors = read_back(path)
    checkpoint = read_checkpoint(quantized)
    arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, ARCHITECTURES[model_type])]
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.attention.key_length"] == 32 and fields[f"{arch}.embedding_length"] == 128
    assert fields[f"{arch}.attention.head_count"] == 4 and fields[f"{arch}.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert len(fields["tokenizer.ggml.tokens"]) == 448, "padded to the embedding rows"
    assert fields["tokenizer.ggml.merges"], "byte-level BPE needs its merges"
    assert ("blk.0.attn_q_norm.weight" in tensors) == (model_type == "qwen3")
    assert ("blk.0.attn_q.bias" in tensors) == (model_type == "qwen2"), "Qwen2 keeps its q/k/v biases"
    assert "output.weight" in tensors
    check_every_tensor(checkpoint, tensors, getattr(gguf.MODEL_ARCH, ARCHITECTURES[model_type]), 4, 2)
    head = next(row for row in report.rows if row["hf_name"] == "lm_head.weight")
    assert head["ggml_type"] == "Q8_0" and head["bits"] == 8


def test_refuses_an_architecture_it_cannot_map(stories_quantized, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(stories_quantized, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out" / "x.gguf"
    with pytest.raises(UnsupportedModel, match="gpt_neox.*supported: \\['llama', 'mistral', 'qwen2', 'qwen3'\\]"):
        export_gguf(copy, out)
    assert not out.exists() and not list(out.parent.glob("*")), "nothing half-written"


def test_refuses_rope_scaling(stories_quantized, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(stories_quantized, copy)
    config = json.loads((copy / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="rope scaling 'yarn'"):
        export_gguf(copy, tmp_path / "x.gguf")


def test_refuses_an_edited_checkpoint(stories_quantized, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(stories_quantized, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="checksum"):
        export_gguf(copy, tmp_path / "x.gguf")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        export_gguf(tmp_path / "missing", tmp_path / "x.gguf")


def test_cli_export_gguf(stories_quantized, tmp_path):
    from brecq.cli import main

    out = tmp_path / "cli.gguf"
    assert main(["export", str(stories_quantized), "--format", "gguf", "--out", str(out), "--fallback", "f16"]) == 0
    _, tensors = read_back(out)
    assert tensors["blk.0.ffn_down.weight"][0] == "F16"


# -- llama.cpp itself (optional: llama-cpp-python builds it from source) ------------------------------

@pytest.fixture(scope="module")
def stories_texts():
    text = require_shared(DATA / "tinystories_val_head.txt").read_text(encoding="utf-8")
    return [s.strip() for s in text.split("\n\n") if s.strip()]


@pytest.mark.slow
def test_llama_cpp_matches_brecq_on_stories260k(stories_quantized, stories_texts, tmp_path):
    pytest.importorskip("llama_cpp")
    import brecq
    from brecq.export.llamacpp import compare_logits, llama_tokenize, open_llama
    from transformers import AutoTokenizer

    path = tmp_path / "stories.gguf"
    export_gguf(stories_quantized, path)
    tokenizer = AutoTokenizer.from_pretrained(stories_quantized)
    llm = open_llama(path, extra_buffer_types=False)
    for text in stories_texts[-100:]:
        assert llama_tokenize(llm, text, add_bos=True) == tokenizer(text)["input_ids"], text
    sequences = [tokenizer(text)["input_ids"][:256] for text in stories_texts[:40]]
    agreement = compare_logits(brecq.load_quantized(stories_quantized), llm, sequences)
    assert agreement.top1 >= 0.99 and agreement.mean_kl <= 1e-3, agreement
    assert agreement.max_margin_at_disagreement < 0.25, agreement


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen3", "qwen2", "llama", "mistral"])
def test_llama_cpp_matches_brecq_on_each_architecture(model_type, stories_texts, tmp_path):
    """A small model of each architecture, trained briefly so its predictions are peaked, with a
    byte-level BPE tokenizer (Qwen2's split; the llama and mistral ones test the architecture)."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    import brecq
    from brecq import Method, get_recipe, quantize_pretrained
    from brecq.export.llamacpp import compare_logits, llama_tokenize, open_llama
    from brecq.models import stories_model

    train, held_out = stories_texts[:400], stories_texts[400:]
    stories_model(tmp_path / "fp", train, model_type)
    quantize_pretrained(str(tmp_path / "fp"), str(tmp_path / "q"), get_recipe("w4g64_mix_attn6", Method.RTN),
                        show_progress=False)
    export_gguf(tmp_path / "q", tmp_path / "q.gguf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "q")
    llm = open_llama(tmp_path / "q.gguf", extra_buffer_types=False)
    for text in held_out[-100:]:
        assert llama_tokenize(llm, text, add_bos=False) == tokenizer(text)["input_ids"], text
    sequences = [tokenizer(text)["input_ids"][:256] for text in held_out[:40]]
    agreement = compare_logits(brecq.load_quantized(tmp_path / "q"), llm, sequences)
    assert agreement.mean_kl <= 1e-3, agreement
    # llama.cpp rounds activations to 8 bits before its Q4_1/Q8_0 dot products (logits off by up to
    # ~0.2 here, where brecq matches a float64 model of the same weights to 1e-5), so positions
    # whose top two are nearly tied can flip: any flip must be such a near-tie.
    assert agreement.max_margin_at_disagreement < 0.25, agreement
    if model_type == "qwen3":
        assert agreement.top1 >= 0.99, agreement


# -- compressed-tensors -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ct():
    return pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("bits", range(2, 9), ids=lambda b: f"w{b}")
@pytest.mark.parametrize("shape", [(1, 64), (7, 128), (33, 192)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_compressed_tensors_layers_decompress_exactly(ct, shape, bits):
    from brecq.export.source import QuantizedLayer
    from brecq.export.to_compressed_tensors import (
        CompressedTensorsReport,
        _layer_tensors,
        stored_bits,
    )
    from compressed_tensors.compressors.pack_quantized.base import (
        PackedQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    codes, scale, zero = random_layer(*shape, bits, 64, seed=bits)
    scale = scale.float().clamp(min=1e-4).half()  # away from float16's subnormals: the products stay exact
    layer = QuantizedLayer("x", bits, 64, codes, scale, zero, None)
    tensors = {k[2:]: v for k, v in _layer_tensors("x", layer, torch.float32, CompressedTensorsReport(None, "")).items()}
    scheme = QuantizationScheme(targets=["x"], weights=QuantizationArgs(
        num_bits=stored_bits(bits), type="int", symmetric=False, strategy="group", group_size=64))
    decompressed = PackedQuantizationCompressor.decompress(dict(tensors), scheme)["weight"]
    assert torch.equal(decompressed, layer.dequantized())
    # The package's own compressor, given brecq's weights and parameters, writes the same tensors.
    offset = 2 ** (stored_bits(bits) - 1)
    again = PackedQuantizationCompressor.compress(
        {"weight": layer.dequantized(), "weight_scale": scale.float(),
         "weight_zero_point": (zero.to(torch.int16) - offset).to(torch.int8)}, scheme)
    assert torch.equal(again["weight_packed"], tensors["weight_packed"])
    assert torch.equal(again["weight_zero_point"], tensors["weight_zero_point"])


def test_compressed_tensors_single_scheme_loads_in_transformers(ct, tmp_path):
    import brecq
    from brecq import Method, get_recipe, quantize_pretrained
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = require_shared(STORIES260K)
    quantize_pretrained(str(model), str(tmp_path / "q"), get_recipe("w4g64", Method.RTN), show_progress=False)
    report = export_compressed_tensors(tmp_path / "q", tmp_path / "ct")
    assert report.dtype == "float32" and report.exact
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert "lm_head" in config["ignore"] and "model.layers.0.mlp.down_proj" in config["ignore"]
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate({k: v for k, v in config.items() if k != "sparsity_config"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", quantization_config=CompressedTensorsConfig(
        dequantize=True))
    checkpoint = read_checkpoint(tmp_path / "q")
    for name, layer in checkpoint.layers.items():
        assert torch.equal(loaded.get_submodule(name).weight, layer.dequantized()), name
    ours = brecq.load_quantized(tmp_path / "q")
    ids = torch.tensor([list(range(1, 200, 3))])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def mixed_export(ct, stories_quantized, tmp_path_factory):
    out = tmp_path_factory.mktemp("ct") / "mixed"
    return export_compressed_tensors(stories_quantized, out), out


def test_compressed_tensors_mixed_recipe_is_exact(mixed_export, stories_quantized):
    import brecq
    from brecq.export.to_compressed_tensors import load_compressed_tensors

    _, out = mixed_export
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    widths = {group["weights"]["num_bits"]: group["targets"] for group in config["config_groups"].values()}
    assert "model.layers.0.self_attn.q_proj" in widths[8] and "model.layers.0.mlp.gate_proj" in widths[4]
    loaded = load_compressed_tensors(out)
    checkpoint = read_checkpoint(stories_quantized)
    for name, layer in checkpoint.layers.items():
        assert torch.equal(loaded.get_submodule(name).weight, layer.dequantized()), name
    ours = brecq.load_quantized(stories_quantized)
    ids = torch.tensor([list(range(1, 300, 5))])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-4)


@pytest.mark.xfail(strict=True, reason="transformers 5.25 decompresses every dense layer with the first config "
                                        "group's scheme (get_dense_scheme), so a W8+W4 model loads wrong; "
                                        "vLLM and brecq.export.load_compressed_tensors match per layer")
def test_transformers_loads_a_mixed_recipe(mixed_export, stories_quantized):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    _, out = mixed_export
    loaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    checkpoint = read_checkpoint(stories_quantized)
    assert all(torch.equal(loaded.get_submodule(n).weight, layer.dequantized())
               for n, layer in checkpoint.layers.items())


def test_compressed_tensors_dtypes(ct, stories_quantized, tmp_path):
    with pytest.raises(ValueError, match="bfloat16 cannot hold"):
        export_compressed_tensors(stories_quantized, tmp_path / "bf16", dtype="bfloat16")
    report = export_compressed_tensors(stories_quantized, tmp_path / "bf16", dtype="bfloat16",
                                       allow_inexact_scales=True)
    assert not report.exact and max(row["max_error_steps"] for row in report.layers) > 0
    half = export_compressed_tensors(stories_quantized, tmp_path / "f16", dtype="float16")
    packed_rows = [row for row in half.layers if row["stored_bits"]]
    assert all(row["max_error_steps"] == 0 for row in packed_rows), "float16 holds the scales exactly"
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_compressed_tensors(stories_quantized, tmp_path / "x", dtype="int8")
