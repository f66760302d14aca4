"""Models larger than memory: safetensors a tensor at a time, and streamed quantization that reads
one block's weights at a time and writes the same file as the in-memory path."""
import hashlib
import io
import json
import logging
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from brecq.quantization.calibration import CalibrationSpec
from brecq.io import CorruptCheckpoint, load_quantized
from brecq.models import build_model, small_config
from brecq.quantization.quantize import quantize, quantize_pretrained
from brecq.quantization.recipe import Method, get_recipe
from brecq.quantization.reconstruct import LossKind, ReconstructionConfig
from brecq.streaming import (MalformedSafetensors, SafetensorsFile, ShardedCheckpoint, TensorEntry, tensor_entry,
                             write_safetensors)
from brecq.streaming.skeleton import skeleton_from_folder

FAST = ReconstructionConfig(iters=20, batch_size=4)
TEXTS = [f"story {i}: the cat {i % 7} met a dog called {i % 5} by the river." for i in range(200)]

# --- safetensors a tensor at a time ---------------------------------------------------------

SAMPLE_TENSORS = {
    "f32 odd": lambda g: torch.randn(7, 13, generator=g),
    "bf16": lambda g: torch.randn(5, 64, generator=g).to(torch.bfloat16),
    "f16 1-row": lambda g: torch.randn(1, 3, generator=g).half(),
    "u8": lambda g: torch.randint(0, 256, (9, 5), generator=g, dtype=torch.uint8),
    "i64 vector": lambda g: torch.randint(-5, 5, (11,), generator=g),
    "scalar": lambda g: torch.tensor(3.5),
    "empty": lambda g: torch.empty(0, 4),
    "bool": lambda g: torch.rand(6, generator=g) > 0.5,
}


def sample(names):
    g = torch.Generator().manual_seed(0)
    return {name.replace(" ", "_"): SAMPLE_TENSORS[name](g) for name in names}


@pytest.mark.parametrize("names", [list(SAMPLE_TENSORS), ["f32 odd"], ["u8", "bf16", "scalar"]],
                         ids=["all-dtypes", "one", "mixed"])
def test_written_files_read_back_through_the_safetensors_package(tmp_path, names):
    tensors = sample(names)
    path = tmp_path / "t.safetensors"
    with open(path, "wb") as f:
        write_safetensors(f, [tensor_entry(k, v) for k, v in tensors.items()], metadata={"format": "pt"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(tensors)
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v)


@pytest.mark.parametrize("names", [list(SAMPLE_TENSORS), ["bf16", "f16 1-row"]], ids=["all-dtypes", "halves"])
def test_files_of_the_safetensors_package_read_back_whole_and_by_rows(tmp_path, names):
    tensors = sample(names)
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    file = SafetensorsFile(path)
    for k, v in tensors.items():
        assert torch.equal(file.read(k), v) and file.read(k).dtype == v.dtype
        if v.dim() >= 1 and v.shape[0] > 2:
            assert torch.equal(file.read(k, slice(1, 3)), v[1:3])
            assert torch.equal(file.read(k, slice(2, None)), v[2:])
        out = torch.empty(v.shape, dtype=torch.float64) if v.dtype.is_floating_point else torch.empty_like(v)
        file.read_into(k, out, slab_bytes=8)  # a few rows at a time
        assert torch.equal(out, v.to(out.dtype))


def test_a_chunked_entry_writes_the_same_bytes_as_a_whole_one(tmp_path):
    tensor = torch.arange(60, dtype=torch.float32).view(12, 5)
    whole, chunked = io.BytesIO(), io.BytesIO()
    write_safetensors(whole, [tensor_entry("w", tensor)])
    write_safetensors(chunked, [TensorEntry("w", tensor.dtype, (12, 5), lambda: [tensor[:5], tensor[5:7], tensor[7:]])])
    assert whole.getvalue() == chunked.getvalue()


def test_an_entry_whose_chunks_disagree_with_it_is_refused():
    entry = TensorEntry("w", torch.float32, (4, 4), lambda: [torch.zeros(3, 4)])
    with pytest.raises(ValueError, match="'w': its chunks hold 48 bytes.*needs 64"):
        write_safetensors(io.BytesIO(), [entry])
    wrong_dtype = TensorEntry("w", torch.float32, (2,), lambda: [torch.zeros(2, dtype=torch.float16)])
    with pytest.raises(ValueError, match="dtype torch.float16, declared torch.float32"):
        write_safetensors(io.BytesIO(), [wrong_dtype])


def test_truncated_and_malformed_files_are_named_in_the_error(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(100, 10)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(MalformedSafetensors, match="'a' ends at byte .* the file is truncated"):
        SafetensorsFile(path)
    path.write_bytes(data[:5])
    with pytest.raises(MalformedSafetensors, match="too short for a safetensors header"):
        SafetensorsFile(path)
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(MalformedSafetensors, match="header length 1000000 does not fit"):
        SafetensorsFile(path)
    path.write_bytes(struct.pack("<Q", 8) + b"not json")
    with pytest.raises(MalformedSafetensors, match="header is not JSON"):
        SafetensorsFile(path)
    header = json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(MalformedSafetensors, match="'a' spans 8 bytes, but F32 \\[3\\] needs 12"):
        SafetensorsFile(path)


def test_a_folder_without_safetensors_weights_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        ShardedCheckpoint(tmp_path)


# --- streamed quantization ------------------------------------------------------------------

def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Small seeded models of three architectures saved in several shards, with a tokenizer and a
    calibration parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from brecq.models import byte_level_bpe_tokenizer

    root = tmp_path_factory.mktemp("streamed")
    pq.write_table(pa.table({"text": TEXTS}), root / "calibration.parquet")
    folders = {}
    for arch in ("qwen3", "llama", "qwen2"):  # tied head; untied head; biases
        folder = root / arch
        tokenizer = byte_level_bpe_tokenizer(TEXTS, 300, folder)
        model = build_model(small_config(arch, len(tokenizer), num_hidden_layers=3), seed=1)
        model.save_pretrained(str(folder), max_shard_size="300KB")
        assert (folder / "model.safetensors.index.json").exists()
        folders[arch] = folder
    return root, folders


@pytest.mark.parametrize("method,recipe", [(Method.RTN, "w4g64_mix_attn6_head8"), (Method.BRECQ, "w4g64_mix_attn6"),
                                           (Method.GPTQ, "w3g64")], ids=["rtn-head8", "brecq-mix", "gptq-w3"])
@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2"])
def test_streamed_quantization_writes_the_in_memory_file_bit_for_bit(checkpoints, tmp_path, arch, method, recipe):
    root, folders = checkpoints
    calibration = None if method is Method.RTN else CalibrationSpec(str(root / "calibration.parquet"), 6, 24, 0)
    files = {}
    for streamed in (False, True):
        out = tmp_path / f"q{streamed}"
        model, report = quantize_pretrained(str(folders[arch]), str(out), get_recipe(recipe, method), calibration,
                                            reconstruction=FAST, streamed=streamed, show_progress=False)
        assert (model is None) == streamed
        assert not (out / ".brecq_work").exists()
        files[streamed] = out / "model.safetensors"
    assert sha256(files[True]) == sha256(files[False])
    a = json.loads((files[False].parent / "config.json").read_text())["quantization_config"]
    b = json.loads((files[True].parent / "config.json").read_text())["quantization_config"]
    assert a["modules"] == b["modules"] and len(a["modules"]) > 0
    assert [blk["loss_final"] for blk in a["report"]["blocks"]] == [blk["loss_final"] for blk in b["report"]["blocks"]]
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(load_quantized(files[True].parent)(ids).logits,
                           load_quantized(files[False].parent)(ids).logits)


def test_a_streamed_skeleton_holds_no_weights_until_a_block_is_read(checkpoints):
    from brecq.streaming.skeleton import StreamedWeights

    _, folders = checkpoints
    model = skeleton_from_folder(folders["llama"])
    assert all(p.is_meta for p in model.parameters())
    weights = StreamedWeights(model, ShardedCheckpoint(folders["llama"]))
    block = weights.load("model.layers.1")
    assert not any(p.is_meta for p in block.parameters())
    assert all(p.is_meta for p in model.model.layers[0].parameters())
    weights.release("model.layers.1")
    assert all(p.is_meta for p in model.parameters())


STREAMED_RUN = textwrap.dedent("""
    import sys, torch
    from brecq.quantization.calibration import CalibrationSpec
    from brecq.quantization.quantize import quantize_pretrained
    from brecq.quantization.recipe import get_recipe
    from brecq.quantization.reconstruct import ReconstructionConfig
    folder, parquet, out = sys.argv[1:4]
    quantize_pretrained(folder, out, get_recipe("w4g64"), CalibrationSpec(parquet, 6, 24, 0),
                        reconstruction=ReconstructionConfig(iters=int(sys.argv[4]), batch_size=4), streamed=True,
                        show_progress=False)
""")


def test_a_killed_streamed_run_resumes_to_the_same_file(checkpoints, tmp_path):
    root, folders = checkpoints
    out = tmp_path / "resumed"
    args = [str(folders["qwen3"]), str(root / "calibration.parquet"), str(out), "300"]
    # cwd outside the repository, so the child imports the installed (compiled) package.
    proc = subprocess.Popen([sys.executable, "-c", STREAMED_RUN, *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    work = out / ".brecq_work"
    deadline = time.time() + 300
    while not (work / "block_000.safetensors").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the run never finished its first block"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists()
    assert len(list(work.glob("block_*.safetensors"))) < 3
    subprocess.run([sys.executable, "-c", STREAMED_RUN, *args], cwd=tmp_path, check=True, timeout=600)
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, "-c", STREAMED_RUN, *args[:2], str(straight), args[3]], cwd=tmp_path, check=True,
                   timeout=600)
    assert sha256(out / "model.safetensors") == sha256(straight / "model.safetensors")
    report = json.loads((out / "config.json").read_text())["quantization_config"]["report"]
    assert report["blocks"][0]["resumed"] and not report["blocks"][-1]["resumed"]


def test_streamed_runs_refuse_what_they_cannot_do(checkpoints, tmp_path):
    root, folders = checkpoints
    calibration = CalibrationSpec(str(root / "calibration.parquet"), 4, 16, 0)
    with pytest.raises(ValueError, match="Fisher loss needs gradients through the whole model"):
        quantize_pretrained(str(folders["qwen3"]), str(tmp_path / "f"), get_recipe("w4g64"), calibration,
                            reconstruction=ReconstructionConfig(iters=2, loss=LossKind.FISHER), streamed=True,
                            show_progress=False)
    skeleton = skeleton_from_folder(folders["qwen3"])
    with pytest.raises(ValueError, match="needs work_dir"):
        quantize(skeleton, get_recipe("w4g64", Method.RTN), source=ShardedCheckpoint(folders["qwen3"]),
                 show_progress=False)


def test_a_checkpoint_missing_a_tensor_is_named(checkpoints):
    from brecq.streaming.skeleton import StreamedWeights

    _, folders = checkpoints
    source = ShardedCheckpoint(folders["llama"])
    del source._where["model.layers.2.mlp.down_proj.weight"]  # as if no shard held it
    weights = StreamedWeights(skeleton_from_folder(folders["llama"]), source)
    with pytest.raises(KeyError, match="no tensor 'model.layers.2.mlp.down_proj.weight'"):
        weights.load("model.layers.2")


def test_large_calibration_sets_go_to_memory_mapped_files(checkpoints, tmp_path, monkeypatch, caplog):
    import brecq.quantization.quantize as quantize_module

    root, folders = checkpoints
    monkeypatch.setattr(quantize_module, "available_memory", lambda: 1 << 20)
    out = tmp_path / "q"
    with caplog.at_level(logging.INFO, logger="brecq"):
        quantize_pretrained(str(folders["qwen3"]), str(out), get_recipe("w4g64", Method.GPTQ),
                            CalibrationSpec(str(root / "calibration.parquet"), 6, 24, 0), show_progress=False)
    assert any("memory-mapped files in" in r.getMessage() and ".brecq_work/activations" in r.getMessage()
               for r in caplog.records)
    assert not (out / ".brecq_work").exists()
    in_memory = tmp_path / "m"
    quantize_pretrained(str(folders["qwen3"]), str(in_memory), get_recipe("w4g64", Method.GPTQ),
                        CalibrationSpec(str(root / "calibration.parquet"), 6, 24, 0), streamed=False,
                        show_progress=False)
    assert sha256(out / "model.safetensors") == sha256(in_memory / "model.safetensors")


def test_a_truncated_quantized_checkpoint_is_refused_on_load(checkpoints, tmp_path):
    _, folders = checkpoints
    out = tmp_path / "q"
    quantize_pretrained(str(folders["llama"]), str(out), get_recipe("w4g64", Method.RTN), show_progress=False)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        load_quantized(out, verify=False)


# --- memory -------------------------------------------------------------------------------------

PEAK_RUN = textwrap.dedent("""
    import json, sys
    import torch
    from brecq.quantization.calibration import CalibrationSpec
    from brecq.io import load_quantized
    from brecq.measurement.measure import peak_rss_mib, rss_mib
    from brecq.quantization.quantize import quantize_pretrained
    from brecq.quantization.recipe import Method, get_recipe
    from brecq.quantization.reconstruct import ReconstructionConfig
    small, folder, parquet, out, step, method = sys.argv[1:7]

    def run(model, target):
        quantize_pretrained(model, target, get_recipe("w4g64_mix_attn6", Method(method)),
                            CalibrationSpec(parquet, 4, 32, 0),
                            reconstruction=ReconstructionConfig(iters=3, batch_size=2), streamed=True,
                            show_progress=False)

    if step == "quantize":
        # Everything whose memory does not grow with the model (imports, the parquet reader's pool,
        # autograd and thread pools) is set up by a run on a 2-block model first.
        run(small, out + ".warm-up")
        base = rss_mib()
        run(folder, out)
    else:
        from brecq.streaming.skeleton import skeleton_from_folder

        skeleton_from_folder(folder)  # imports the architecture's code (~100 MB): not the weights
        base = rss_mib()
        model = load_quantized(out)
        with torch.no_grad():
            model(torch.zeros(1, 4, dtype=torch.long))
    print(json.dumps({"base_mib": base, "peak_mib": peak_rss_mib()}))
""")


@pytest.mark.parametrize("method", [Method.BRECQ, Method.GPTQ, Method.RTN], ids=lambda m: m.value)
def test_streamed_quantization_and_loading_peak_far_below_the_full_precision_weights(tmp_path, method):
    """A 96-block model of ~360 MB float32 in shards of 30 MB: quantizing it must not raise the
    resident memory by more than a quarter of that (a block is ~4 MB), and loading the quantized
    model must not come near its dense size (the packed file is ~55 MB; loading holds it, a
    layout copy and the allocator's slack)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from brecq.models import byte_level_bpe_tokenizer

    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "calibration.parquet")
    full_mib = {}
    for name, layers in (("small", 2), ("fp", 96)):
        folder = tmp_path / name
        tokenizer = byte_level_bpe_tokenizer(TEXTS, 300, folder)
        model = build_model(small_config("qwen3", len(tokenizer), hidden_size=256, intermediate_size=1024,
                                         num_hidden_layers=layers), seed=0)
        full_mib[name] = sum(p.numel() * 4 for p in model.parameters()) / 2**20
        model.save_pretrained(str(folder), max_shard_size="30MB")
        del model
    out = tmp_path / "q"
    grown = {}
    for step in ("quantize", "load"):
        done = subprocess.run([sys.executable, "-c", PEAK_RUN, str(tmp_path / "small"), str(tmp_path / "fp"),
                               str(tmp_path / "calibration.parquet"), str(out), step, method.value],
                              cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        grown[step] = result["peak_mib"] - result["base_mib"]
    assert full_mib["fp"] > 300
    assert grown["quantize"] < full_mib["fp"] / 4, (grown, full_mib)
    assert grown["load"] < full_mib["fp"] / 2, (grown, full_mib)


def test_the_command_line_streams_by_default_and_in_memory_on_request(tmp_path):
    from conftest import STORIES260K, require_shared

    model = require_shared(STORIES260K)
    digests = {}
    for flags in ([], ["--in-memory"]):
        out = tmp_path / ("memory" if flags else "streamed")
        done = subprocess.run([sys.executable, "-m", "brecq", "quantize", str(model), "--out", str(out), "--method",
                               "rtn", "--quiet", *flags], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "peak resident memory" in done.stdout
        digests[bool(flags)] = sha256(out / "model.safetensors")
    assert digests[True] == digests[False]
