"""Study caching keyed by content: each kind of change recomputes what it affects and nothing else."""
import json
import shutil

import pyarrow.parquet as pq
import pytest
from brecq.study import load_study_config, run_study
from brecq.study.runner import StudyBusy, study_lock
from conftest import DATA, STORIES260K, require_shared

CONFIG = """
[study]
name = "cache-test"
output = "out"
seed = 0
fused_norms = false

[[models]]
label = "stories"
path = "{model}"
role = "base"
[models.calibration]
path = "calib.txt"
samples = {samples}
seq_len = 32

[[variants]]
label = "Q"
recipe = "{recipe}"
method = "{method}"

[[datasets]]
path = "arc.parquet"
task = "arc"
limit = {limit}

[measure]
prompt_tokens = 8
decode_tokens = 2
repeats = {repeats}
max_seconds = 0
memory_subprocess = false
"""

EVERYTHING = {"stories / Q: quantized model", "stories / unquantized: arc evaluation", "stories / Q: arc evaluation",
              "stories / unquantized: size, latency and memory", "stories / Q: size, latency and memory",
              "stories: side-by-side decode latency"}


@pytest.fixture
def study(tmp_path):
    require_shared(STORIES260K)
    shutil.copytree(STORIES260K, tmp_path / "model")
    (tmp_path / "model").chmod(0o755)
    for f in (tmp_path / "model").iterdir():
        f.chmod(0o644)
    text = (DATA / "tinystories_val_head.txt").read_text(encoding="utf-8")
    (tmp_path / "calib.txt").write_text(text[:20000], encoding="utf-8")
    pq.write_table(pq.read_table(DATA / "test-ai2_arc.parquet").slice(0, 12), tmp_path / "arc.parquet")
    settings = {"model": "model", "samples": 4, "recipe": "w4g64", "method": "rtn", "limit": 6, "repeats": 1}

    def run(**changes):
        settings.update(changes)
        (tmp_path / "study.toml").write_text(CONFIG.format(**settings))
        results = run_study(load_study_config(tmp_path / "study.toml"), show_progress=False)
        return {line.rsplit(" ", 1)[0] if "quantized model" in line else line for line in results["reused"]}

    assert run() == set(), "a first run reuses nothing"
    assert run() == EVERYTHING, "a second run reuses everything"
    return tmp_path, run


def test_changed_model_weights_recompute_everything(study):
    root, run = study
    weights = root / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # one weight's exponent: the same file size and shapes, other values
    weights.write_bytes(bytes(data))
    assert run() == set()


def test_changed_model_path_recomputes_everything(study):
    root, run = study
    shutil.copytree(root / "model", root / "other")
    assert run(model="other") == set()


@pytest.mark.parametrize("change", [{"recipe": "w3g64"}, {"method": "gptq"}], ids=["recipe", "method"])
def test_changed_variant_recomputes_the_variant_only(study, change):
    _, run = study
    assert run(**change) == {"stories / unquantized: arc evaluation", "stories / unquantized: size, latency and memory"}


def test_changed_calibration_recomputes_the_quantized_model_only(study):
    root, run = study
    run(method="gptq")
    assert run() == EVERYTHING
    kept = {"stories / unquantized: arc evaluation", "stories / unquantized: size, latency and memory"}
    assert run(samples=6) == kept, "calibration spec"
    with open(root / "calib.txt", "a", encoding="utf-8") as f:
        f.write("\n\nA new story about a cat.")
    assert run() == kept, "calibration data"


def test_changed_dataset_recomputes_the_evaluations_only(study):
    root, run = study
    pq.write_table(pq.read_table(DATA / "test-ai2_arc.parquet").slice(6, 12), root / "arc.parquet")
    assert run() == EVERYTHING - {"stories / unquantized: arc evaluation", "stories / Q: arc evaluation"}
    assert run(limit=5) == EVERYTHING - {"stories / unquantized: arc evaluation", "stories / Q: arc evaluation"}


def test_changed_timing_settings_remeasure_only(study):
    _, run = study
    assert run(repeats=2) == {"stories / Q: quantized model", "stories / unquantized: arc evaluation",
                              "stories / Q: arc evaluation"}


def test_the_report_says_what_was_reused(study):
    root, _ = study
    report = (root / "out" / "report.md").read_text()
    assert "## Reused from earlier runs" in report and "stories / Q: arc evaluation" in report


def test_a_second_study_on_the_same_folder_is_refused(study):
    root, run = study
    with study_lock(root / "out"), pytest.raises(StudyBusy, match=r"out is in use by brecq study \(pid \d+ on .*, since "):
        run()
    assert run() == EVERYTHING, "the lock is released with its holder"
    assert json.loads((root / "out" / "results.json").read_text())["study"] == "cache-test"
