"""torchrun: evaluations and studies over 2 gloo processes give what one process gives; a killed
rank's work resumes; a rank that raises stops them all and nothing is written."""
import json
import subprocess
import sys
import textwrap

import pytest

from conftest import DATA, STORIES260K, require_shared

ARC = DATA / "test-ai2_arc.parquet"
TIMEOUT = 600

# Evaluates stories260k on ARC; on rank FAIL_RANK (if any) the scoring of its second chunk raises
# (mode "raise") or kills the process (mode "kill") after its first chunk is journaled.
EVAL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import brecq.evaluation.runner as runner
    from brecq.distributed import init_from_environment
    from brecq.evaluation.runner import Task, evaluate
    from brecq.io import load_model_any
    model_path, data, out, limit, mode, fail_rank = sys.argv[1:7]
    w = init_from_environment("cpu")
    if mode != "none" and w.rank == int(fail_rank):
        calls = []
        original = runner.score_arc_loglikelihood
        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise ValueError("injected failure")
            return original(*args, **kwargs)
        runner.score_arc_loglikelihood = failing
    model, tokenizer = load_model_any(model_path)
    evaluate(model, tokenizer, Task.ARC, data, out, limit=int(limit), show_progress=False)
    from brecq.distributed import shutdown
    shutdown()
""")


def _launcher(processes: int) -> list[str]:
    """Python for one process; torchrun with ``processes`` local ranks otherwise."""
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]


def _run(tmp_path, out, processes, limit, mode="none", fail_rank=1):
    script = tmp_path / "evaluate.py"
    script.write_text(EVAL_SCRIPT)
    args = [str(require_shared(STORIES260K)), str(ARC), str(out), str(limit), mode, str(fail_rank)]
    command = [*_launcher(processes), str(script), *args]
    # cwd outside the repository, so the children import the installed (compiled) package.
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)


def _records(out):
    return (out / "records.jsonl").read_text()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    done = _run(tmp, tmp / "out", 1, 100)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "out"


def test_two_ranks_score_the_same_records_in_the_same_order(one_process, tmp_path):
    done = _run(tmp_path, tmp_path / "out", 2, 100)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _records(tmp_path / "out") == _records(one_process)  # byte for byte: records and their order
    two = json.loads((tmp_path / "out" / "results.json").read_text())
    one = json.loads((one_process / "results.json").read_text())
    assert two["metrics"] == one["metrics"] and two["n"] == one["n"] == 100
    assert two["processes"] == 2 and one["processes"] == 1
    assert not list((tmp_path / "out").glob("records.partial*"))


def test_a_killed_rank_is_resumed_on_rerun(one_process, tmp_path):
    out = tmp_path / "out"
    killed = _run(tmp_path, out, 2, 100, mode="kill", fail_rank=1)
    assert killed.returncode != 0
    assert not (out / "results.json").exists()
    journals = list(out.glob("records.partial.rank*.jsonl"))
    assert journals, "no rank journaled its first chunk"
    rerun = _run(tmp_path, out, 2, 100)  # the same command again
    assert rerun.returncode == 0, rerun.stderr[:6000]
    result = json.loads((out / "results.json").read_text())
    assert result["reused"] >= 32 and result["scored_now"] == 100 - result["reused"]
    assert _records(out) == _records(one_process)


def test_a_rank_that_raises_stops_every_rank_and_nothing_is_written(tmp_path):
    out = tmp_path / "out"
    done = _run(tmp_path, out, 2, 100, mode="raise", fail_rank=1)
    assert done.returncode != 0
    assert "rank 1 of 2 failed (ValueError: injected failure)" in done.stderr
    assert not (out / "results.json").exists() and not (out / "records.jsonl").exists()


STUDY = """
[study]
name = "torchrun-test"
output = "{out}"
seed = 0

[[models]]
label = "stories"
path = "{model}"
role = "base"

[[variants]]
label = "RTN W4"
recipe = "w4g64"
method = "rtn"

[[datasets]]
path = "{arc}"
task = "arc"
limit = 70

[measure]
prompt_tokens = 8
decode_tokens = 2
repeats = 1
max_seconds = 0
memory_subprocess = false
"""


def test_a_study_under_torchrun_gives_the_one_process_metrics(tmp_path):
    runs = {}
    for processes in (1, 2):
        config = tmp_path / f"study{processes}.toml"
        out = tmp_path / f"out{processes}"
        config.write_text(STUDY.format(out=out, model=require_shared(STORIES260K), arc=ARC))
        done = subprocess.run([*_launcher(processes), "-m", "brecq", "study", str(config), "--quiet"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("done in") == 1  # one rank reports
        runs[processes] = json.loads((out / "results.json").read_text())
    for variant in ("unquantized", "RTN W4"):
        one, two = (runs[p]["models"]["stories"]["variants"][variant] for p in (1, 2))
        dataset = next(iter(one["datasets"]))
        assert two["datasets"][dataset]["metrics"] == one["datasets"][dataset]["metrics"]
        assert (tmp_path / "out2" / "runs" / "stories").exists()
        assert two["measure"]["measured_on"] == {"rank": 0, "processes": 2}
    report = (tmp_path / "out2" / "report.md").read_text()
    assert "measured by rank 0 of 2 torchrun processes, while the other ranks waited idle" in report
    assert "torchrun processes" not in (tmp_path / "out1" / "report.md").read_text()
    records = sorted((tmp_path / "out1" / "runs").rglob("records.jsonl"))
    assert records and all((tmp_path / "out2" / p.relative_to(tmp_path / "out1")).read_text() == p.read_text()
                           for p in records)


# Quantizes a 4-block seeded Qwen3 in memory (or streamed from a saved folder) with the work
# folder every rank shares; each rank saves its packed layers, and the losses of its report.
QUANTIZE_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from brecq.distributed import init_from_environment
    from brecq.models import build_model, qwen3_config
    from brecq.quantization.quantize import quantize
    from brecq.quantization.recipe import Method, get_recipe
    from brecq.quantization.reconstruct import InputSource, ReconstructionConfig
    from brecq_ext import quant_linear_layers
    work, out, source, method = sys.argv[1:5]
    w = init_from_environment("cpu")
    if len(sys.argv) > 5 and w.rank == int(sys.argv[5]):  # this rank fails in its first block
        import brecq.quantization.quantize
        def failing(*args, **kwargs):
            raise RuntimeError("injected failure")
        brecq.quantization.quantize._quantize_block = failing
    model = build_model(qwen3_config("tiny", num_hidden_layers=4), seed=0)
    ids = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    config = ReconstructionConfig(iters=60, batch_size=4, input_source=InputSource(source))
    report = quantize(model, get_recipe("w4g64", Method(method)), ids, reconstruction=config, work_dir=work,
                      show_progress=False)
    state = {f"{n}.{k}": v.clone() for n, layer in quant_linear_layers(model) for k, v in layer.state_dict().items()}
    torch.save({"state": state, "losses": [b.loss_final for b in report.blocks]}, f"{out}.rank{w.rank}.pt")
    from brecq.distributed import shutdown
    shutdown()
""")


def _quantize(tmp_path, name, processes, source, method="brecq", fail_rank=None):
    script = tmp_path / "quantize.py"
    script.write_text(QUANTIZE_SCRIPT)
    args = [str(tmp_path / f"work_{name}"), str(tmp_path / name), source, method]
    args += [str(fail_rank)] if fail_rank is not None else []
    done = subprocess.run([*_launcher(processes), str(script), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=TIMEOUT)
    if fail_rank is not None:
        return done
    assert done.returncode == 0, done.stderr[-3000:]
    import torch

    return [torch.load(tmp_path / f"{name}.rank{r}.pt") for r in range(processes)]


def _codes_agreement(a, b) -> float:
    from brecq_ext import ops

    same = total = 0
    for key in a:
        if key.endswith(".packed"):
            ca, cb = ops.unpack(a[key], 4, 64, a[key].shape[1] * 2), ops.unpack(b[key], 4, 64, b[key].shape[1] * 2)
            same += int((ca == cb).sum())
            total += ca.numel()
    return same / total


def test_blocks_shared_out_over_ranks_give_the_one_process_weights_bit_for_bit(tmp_path):
    """Inputs from the full-precision model: blocks are independent, rank r takes blocks r, r+2, ..."""
    import torch

    one = _quantize(tmp_path, "one", 1, "full_precision")[0]
    ranks = _quantize(tmp_path, "two", 2, "full_precision")
    for rank in ranks:
        assert rank["state"].keys() == one["state"].keys()
        assert all(torch.equal(rank["state"][k], one["state"][k]) for k in one["state"])
        assert rank["losses"] == one["losses"]


def test_a_batch_split_over_ranks_learns_the_one_process_rounding_within_float_tolerance(tmp_path):
    """Inputs from the quantized blocks: every rank works on every block, each on half of each
    step's batch, gradients summed; only the order of float sums differs from one process."""
    import torch

    one = _quantize(tmp_path, "one", 1, "quantized")[0]
    ranks = _quantize(tmp_path, "two", 2, "quantized")
    assert all(torch.equal(ranks[1]["state"][k], ranks[0]["state"][k]) for k in ranks[0]["state"])  # in step
    assert _codes_agreement(ranks[0]["state"], one["state"]) > 0.995
    for two_loss, one_loss in zip(ranks[0]["losses"], one["losses"]):
        assert abs(two_loss - one_loss) <= 0.02 * one_loss + 1e-9


@pytest.mark.parametrize("source", ["full_precision", "quantized"])
def test_a_rank_that_fails_to_quantize_stops_every_rank(tmp_path, source):
    done = _quantize(tmp_path, "fail", 2, source, fail_rank=1)
    assert done.returncode != 0
    if source == "full_precision":  # the ranks meet after the blocks and stop together, naming rank 1
        assert "rank 1 of 2 failed (RuntimeError: injected failure)" in done.stderr
    else:  # rank 1 exits with its error; rank 0's all-reduce breaks and torchrun stops it
        assert "RuntimeError: injected failure" in done.stderr
    assert not list(tmp_path.glob("fail.rank*.pt"))  # no rank went on as if it had finished


STREAMED_SCRIPT = textwrap.dedent("""
    import sys
    from brecq.quantization.calibration import CalibrationSpec
    from brecq.distributed import init_from_environment
    from brecq.quantization.quantize import quantize_pretrained
    from brecq.quantization.recipe import Method, get_recipe
    from brecq.quantization.reconstruct import InputSource, ReconstructionConfig
    folder, parquet, out, method = sys.argv[1:5]
    init_from_environment("cpu")
    method = Method(method)
    quantize_pretrained(folder, out, get_recipe("w4g64_mix_attn6", method),
                        None if method is Method.RTN else CalibrationSpec(parquet, 6, 24, 0),
                        reconstruction=ReconstructionConfig(iters=20, batch_size=4,
                                                            input_source=InputSource.FULL_PRECISION),
                        streamed=True, show_progress=False)
    from brecq.distributed import shutdown
    shutdown()
""")


@pytest.mark.parametrize("method", ["rtn", "brecq"])
def test_streamed_quantization_over_ranks_writes_the_one_process_file(tmp_path, method):
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from brecq.models import build_model, byte_level_bpe_tokenizer, small_config

    texts = [f"story {i}: the cat {i % 7} met a dog called {i % 5}." for i in range(200)]
    folder = tmp_path / "fp"
    tokenizer = byte_level_bpe_tokenizer(texts, 300, folder)
    build_model(small_config("llama", len(tokenizer), num_hidden_layers=3), seed=1).save_pretrained(
        str(folder), max_shard_size="300KB")
    pq.write_table(pa.table({"text": texts}), tmp_path / "calibration.parquet")
    script = tmp_path / "streamed.py"
    script.write_text(STREAMED_SCRIPT)
    digests = {}
    for processes in (1, 2):
        out = tmp_path / f"q{processes}"
        done = subprocess.run([*_launcher(processes), str(script), str(folder), str(tmp_path / "calibration.parquet"), str(out),
                               method], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr[-3000:]
        assert not (out / ".brecq_work").exists()
        digests[processes] = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert digests[1] == digests[2]
