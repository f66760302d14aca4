"""BRECQ inside llama.cpp's block types: the layouts against the ``gguf`` package's dequantizers,
the type maps and bytes against llama.cpp's own quantizer (when ``llama-cpp-python`` is
installed), and learned rounding on those grids."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from brecq.kquants import (
    BlockType,
    Search,
    dequantize,
    get_preset,
    quantize_blocks,
    read_grid,
    write_codes,
)
from brecq.kquants.presets import use_more_bits

gguf = pytest.importorskip("gguf")
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
SEARCHES = [Search.MIN_MAX, pytest.param(Search.LLAMA_CPP, marks=pytest.mark.skipif(
    not HAVE_LLAMA_CPP, reason="llama-cpp-python not installed"))]


def weights(rows, cols, seed=0):
    g = np.random.default_rng(seed)
    w = (g.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    w[0, : min(cols, 40)] = 0.0  # an all-zero group: a zero step
    if rows > 1:
        w[1] *= 30.0  # one row far larger than the rest
    if rows > 2:
        w[2] = np.abs(w[2])  # no negative weight: a zero min
    return w


def shapes_for(block_type):
    k = block_type.block
    return [(1, k), (3, 2 * k), (7, 3 * k)]


CASES = [(t, s) for t in BlockType for s in shapes_for(t)]


def gguf_values(block_type, data):
    return gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, block_type.value))


@pytest.mark.parametrize("search", SEARCHES, ids=lambda s: s.value)
@pytest.mark.parametrize(("block_type", "shape"), CASES, ids=[f"{t.value}-{r}x{k}" for t, (r, k) in CASES])
def test_grid_reads_what_gguf_dequantizes(block_type, shape, search):
    w = weights(*shape)
    data = quantize_blocks(block_type, w, search)
    assert data.shape == (shape[0], shape[1] // block_type.block * block_type.block_bytes)
    ours = dequantize(block_type, data, shape[1])
    np.testing.assert_array_equal(ours, gguf_values(block_type, data))  # equal values (the sign of 0 aside)
    grid = read_grid(block_type, data, shape[1])
    assert (grid.scale >= 0).all() and int(grid.codes.max()) <= grid.qmax
    np.testing.assert_array_equal(write_codes(block_type, data, grid, grid.codes), data)
    # The grid is a quantizer of w: the error is within about a step (looser for llama.cpp's
    # searches, which trade range for error).
    step = grid.expand(grid.scale)
    assert (np.abs(ours - w) <= 1.5 * step + 1e-7).mean() > 0.99


@pytest.mark.parametrize(("block_type", "shape"), CASES, ids=[f"{t.value}-{r}x{k}" for t, (r, k) in CASES])
def test_any_codes_round_trip_through_the_blocks(block_type, shape):
    w = weights(*shape, seed=1)
    data = quantize_blocks(block_type, w, Search.MIN_MAX)
    grid = read_grid(block_type, data, shape[1])
    codes = np.random.default_rng(2).integers(0, grid.qmax + 1, size=grid.codes.shape, dtype=np.uint8)
    rewritten = write_codes(block_type, data, grid, codes)
    again = read_grid(block_type, rewritten, shape[1])
    np.testing.assert_array_equal(again.codes, codes)
    np.testing.assert_array_equal(again.scale, grid.scale)
    np.testing.assert_array_equal(gguf_values(block_type, rewritten), grid.values(codes))


def test_block_sizes_are_llama_cpps():
    sizes = {t.value: (t.block, t.block_bytes, t.bits_per_weight) for t in BlockType}
    for name, (block, size, _) in sizes.items():
        assert gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, name)] == (block, size), name
    assert sizes["Q4_K"][2] == 4.5 and sizes["Q6_K"][2] == 6.5625 and sizes["Q5_K"][2] == 5.5


def test_bad_input_is_refused_with_its_name():
    w = weights(2, 256)
    with pytest.raises(ValueError, match="divisible by 256"):
        quantize_blocks(BlockType.Q4_K, w[:, :96], Search.MIN_MAX)
    with pytest.raises(ValueError, match="2-D"):
        quantize_blocks(BlockType.Q8_0, w[0], Search.MIN_MAX)
    with pytest.raises(ValueError, match="non-finite"):
        bad = w.copy()
        bad[0, 0] = np.nan
        quantize_blocks(BlockType.Q8_0, bad, Search.MIN_MAX)
    with pytest.raises(ValueError, match="importance"):
        quantize_blocks(BlockType.Q4_K, w, Search.MIN_MAX, importance=np.ones(7, np.float32))
    data = quantize_blocks(BlockType.Q4_K, w, Search.MIN_MAX)
    with pytest.raises(ValueError, match="takes 144 bytes"):
        read_grid(BlockType.Q4_K, data[:, :100], 256)
    grid = read_grid(BlockType.Q4_K, data, 256)
    with pytest.raises(ValueError, match="at most 15"):
        write_codes(BlockType.Q4_K, data, grid, np.full_like(grid.codes, 16))
    with pytest.raises(ValueError, match="preset must be one of"):
        get_preset("Q3_K_XL")


def test_more_bits_layers_follow_llama_cpp_rule():
    # 8 layers: the first and last and every third in between ((i - 1) % 3 == 2).
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    preset = get_preset("Q4_K_M")
    assert preset.block_type("ffn_down", 0, 8, 768) is BlockType.Q6_K
    assert preset.block_type("ffn_down", 1, 8, 768) is BlockType.Q4_K
    assert preset.block_type("ffn_down", 1, 8, 800) is BlockType.Q5_0  # 800 is no multiple of 256
    assert preset.block_type("ffn_down", 0, 8, 800) is BlockType.Q8_0
    assert preset.block_type("ffn_down", 1, 8, 172) is None  # nor of 32: F16


# -- learned rounding on a grid ----------------------------------------------------------------------

def test_grid_adaround_layer_starts_at_the_weight_and_hardens_to_floor_or_ceil():
    from brecq.kquants.rounding import GridAdaRoundLinear
    from brecq.quantization.reconstruct import Rounding

    w = torch.from_numpy(weights(5, 512))
    linear = torch.nn.Linear(512, 5, bias=False)
    linear.weight.data.copy_(w)
    data = quantize_blocks(BlockType.Q4_K, w.numpy(), Search.MIN_MAX)
    grid = read_grid(BlockType.Q4_K, data, 512)
    layer = GridAdaRoundLinear(linear, grid, "cpu")
    eye = torch.eye(512)
    soft = layer(eye).t()
    inside = (w + torch.from_numpy(grid.expand(grid.offset)) >= 0)
    inside &= w <= torch.from_numpy(grid.values(np.full_like(grid.codes, grid.qmax)))
    assert torch.allclose(soft[inside], w[inside], atol=1e-3 * float(w.abs().max()))
    layer.rounding = Rounding.NEAREST
    np.testing.assert_array_equal(layer(eye).t().detach().numpy(), grid.values())
    with torch.no_grad():
        layer.v.normal_(0, 3)
    codes = layer.result()
    assert ((codes.float() - layer.floor).abs() <= 1).all()
    assert set(torch.unique(codes.float() - layer.floor.clamp(0, grid.qmax)).tolist()) <= {-1.0, 0.0, 1.0}


@pytest.fixture(scope="module")
def seeded_model(tmp_path_factory):
    """Qwen3 shapes whose rows 256-blocks divide (hidden 256, intermediate 512) and one whose
    intermediate (320) they do not, 8 layers so the Q4_K_M map has every case."""
    from brecq.models import build_model, byte_level_bpe_tokenizer, small_config

    root = tmp_path_factory.mktemp("kq")
    texts = [f"Story {i}: the {c} cat sat on the mat and said {i * 7} words." for i, c in
             enumerate(["red", "blue", "green", "small", "big"] * 40)]
    folders = {}
    for name, overrides in {"even": {"intermediate_size": 512}, "odd": {"intermediate_size": 320}}.items():
        folder = root / name
        tokenizer = byte_level_bpe_tokenizer(texts, 400, folder)
        config = small_config("qwen3", 448, num_hidden_layers=8, eos_token_id=tokenizer.eos_token_id, **overrides)
        build_model(config, seed=5).save_pretrained(str(folder))
        folders[name] = folder
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": texts}), root / "calibration.parquet")
    return folders, root / "calibration.parquet"


def _llama_quantize(source_dir, preset, out):
    from brecq.export import export_gguf_full_precision
    from brecq.export.llamacpp import llama_quantize

    fp = out.with_suffix(".fp.gguf")
    export_gguf_full_precision(source_dir, fp)
    llama_quantize(fp, out, get_preset(preset).llama_ftype)
    return {t.name: t for t in gguf.GGUFReader(str(out)).tensors}


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python not installed")
@pytest.mark.parametrize("preset", ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("model", ["even", "odd"])
def test_searched_codes_are_llama_quantize_byte_for_byte(seeded_model, preset, model, tmp_path):
    """RTN with llama.cpp's search writes the file llama-quantize writes: the same tensor types
    (the preset's map, fallbacks included) and the same bytes."""
    from brecq.kquants import quantize_gguf

    folders, _ = seeded_model
    theirs = _llama_quantize(folders[model], preset, tmp_path / "theirs.gguf")
    _, report = quantize_gguf(folders[model], tmp_path / "ours.gguf", preset=preset, method="rtn",
                              show_progress=False)
    ours = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "ours.gguf")).tensors}
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert ours[name].tensor_type == t.tensor_type, name
        np.testing.assert_array_equal(np.asarray(ours[name].data), np.asarray(t.data), err_msg=name)
    if model == "odd" and preset == "Q4_K_M":
        assert {r["type"] for r in report.tensors if r["role"] == "ffn_down"} == {"Q5_0", "Q8_0"}


@pytest.mark.parametrize("search", SEARCHES, ids=lambda s: s.value)
def test_brecq_on_the_grid_lowers_block_error_and_the_file_holds_it(seeded_model, search, tmp_path):
    from brecq.quantization.calibration import CalibrationSpec
    from brecq.kquants import load_gguf_weights, quantize_gguf
    from brecq.quantization.reconstruct import ReconstructionConfig
    from transformers import AutoModelForCausalLM

    folders, calibration = seeded_model
    out = tmp_path / "brecq.gguf"
    model, report = quantize_gguf(folders["even"], out, preset="Q4_K_M", method="brecq", search=search,
                                  calibration=CalibrationSpec(str(calibration), 8, 32, 0),
                                  reconstruction=ReconstructionConfig(iters=40, batch_size=4), show_progress=False)
    losses = [(b["loss_searched"], b["loss_learned"]) for b in report.blocks]
    assert len(losses) == 8 and all(learned < searched for searched, learned in losses), losses
    assert report.bits_per_weight() < 5.0  # Q4_K with some Q6_K: native sizes, scales and mins counted
    # What the model holds is what the file holds.
    fresh = AutoModelForCausalLM.from_pretrained(folders["even"], dtype=torch.float32)
    types = load_gguf_weights(fresh, out)
    assert types["model.layers.0.mlp.down_proj.weight"] == "Q6_K"
    assert types["model.layers.1.mlp.down_proj.weight"] == "Q4_K"
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), name


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python not installed")
def test_llama_cpp_runs_the_brecq_file_as_brecq_does(seeded_model, tmp_path):
    """llama.cpp's logits on the BRECQ file against brecq's model, as close as llama.cpp's logits
    on llama-quantize's own Q4_K_M file are to that file's weights in PyTorch: both differ only by
    llama.cpp quantizing activations to 8 bits for its K-quant dot products."""
    from brecq.quantization.calibration import CalibrationSpec
    from brecq.export.llamacpp import open_llama
    from brecq.kquants import load_gguf_weights, quantize_gguf
    from brecq.quantization.reconstruct import ReconstructionConfig
    from transformers import AutoModelForCausalLM

    folders, calibration = seeded_model
    ours_path = tmp_path / "brecq.gguf"
    model, _ = quantize_gguf(folders["odd"], ours_path, method="brecq", importance=True,
                             calibration=CalibrationSpec(str(calibration), 8, 32, 0),
                             reconstruction=ReconstructionConfig(iters=20, batch_size=4), show_progress=False)
    theirs_path = tmp_path / "theirs.gguf"
    _llama_quantize(folders["odd"], "Q4_K_M", theirs_path)
    theirs_model = AutoModelForCausalLM.from_pretrained(folders["odd"], dtype=torch.float32)
    load_gguf_weights(theirs_model, theirs_path)
    tokens = [3, 17, 52, 99, 140, 7, 300, 12, 45, 61, 88, 200]

    def gap(path, torch_model):
        llm = open_llama(path, extra_buffer_types=False)
        llm.reset()
        llm.eval(tokens)
        run = np.array(llm.scores[:len(tokens)], dtype=np.float32)
        with torch.no_grad():
            expected = torch_model(torch.tensor([tokens])).logits[0].numpy()
        return float(np.abs(run - expected).max() / np.abs(expected).max())

    ours, reference = gap(ours_path, model), gap(theirs_path, theirs_model)
    assert ours < 0.1 and ours < 3 * reference + 1e-3, (ours, reference)


def test_cli_writes_a_gguf_with_the_presets_types(seeded_model, tmp_path, capsys):
    import json

    from brecq.cli import main

    folders, calibration = seeded_model
    out = tmp_path / "cli.gguf"
    assert main(["quantize", str(folders["odd"]), "--out", str(out), "--gguf", "Q4_K_M", "--method", "rtn",
                 "--search", "min_max", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["preset"] == "Q4_K_M" and summary["method"] == "rtn" and 4.5 < summary["bits_per_weight"] < 6
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.1.attn_q.weight"] == "Q4_K" and types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["token_embd.weight"] == "Q6_K"  # tied: llama.cpp's output type
    assert main(["quantize", str(folders["odd"]), "--out", str(out), "--gguf", "Q4_K_M", "--method", "gptq",
                 "--calib", str(calibration), "--quiet"]) != 0
    assert "method must be brecq or rtn" in capsys.readouterr().err
