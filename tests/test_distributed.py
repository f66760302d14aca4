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
    import torch.distributed
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
""")


def _run(tmp_path, out, processes, limit, mode="none", fail_rank=1):
    script = tmp_path / "evaluate.py"
    script.write_text(EVAL_SCRIPT)
    args = [str(require_shared(STORIES260K)), str(ARC), str(out), str(limit), mode, str(fail_rank)]
    if processes == 1:
        command = [sys.executable, str(script), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   str(script), *args]
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
        launcher = ([sys.executable, "-m", "brecq"] if processes == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "brecq"])
        done = subprocess.run([*launcher, "study", str(config), "--quiet"], cwd=tmp_path, capture_output=True,
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
    records = sorted((tmp_path / "out1" / "runs").rglob("records.jsonl"))
    assert records and all((tmp_path / "out2" / p.relative_to(tmp_path / "out1")).read_text() == p.read_text()
                           for p in records)
