"""The study runner end to end on the real tiny model and the study's parquet files."""
import json

import pytest

from brecq.study import load_study_config, run_study
from brecq.study.config import StudyConfigError
from brecq.study.report import _conclusions, comparison_row, resource_rows

from conftest import DATA, STORIES260K, require_shared

CONFIG = """
[study]
name = "stories-test"
output = "{out}"
seed = 0

[[models]]
label = "stories"
path = "{model}"
role = "base"
[models.calibration]
path = "{text}"
samples = 8
seq_len = 64

[[variants]]
label = "BRECQ W4/W6"
recipe = "w4g64_mix_attn6"
method = "brecq"
iters = 20

[[datasets]]
path = "{arc}"
task = "arc"
limit = 24

[[datasets]]
path = "{squad}"
task = "squad"
limit = 6

[measure]
prompt_tokens = 16
decode_tokens = 4
repeats = 1
max_seconds = 0
"""


def _config(tmp_path, **overrides):
    values = dict(out=tmp_path / "out", model=require_shared(STORIES260K), text=DATA / "tinystories_val_head.txt",
                  arc=DATA / "test-ai2_arc.parquet", squad=DATA / "test-squad_v2.parquet")
    values.update(overrides)
    path = tmp_path / "study.toml"
    path.write_text(CONFIG.format(**values))
    return path


def test_study_end_to_end_and_report_matches_results(tmp_path):
    config = load_study_config(_config(tmp_path))
    results = run_study(config, show_progress=False)
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    for section in ("Executive summary", "Model configurations", "Performance", "Resource efficiency",
                    "Technical details", "Conclusions", "Recommendations"):
        assert f"## {section}" in report or f"### {section}" in report
    analysis = saved["analysis"]["models"]["stories"]
    assert len(analysis["comparisons"]) == 2 + 2  # ARC acc, acc_norm; SQuAD EM, F1
    for comparison in analysis["comparisons"]:
        assert comparison_row(comparison) in report
    for variant, resources in analysis["resources"].items():
        for row in resource_rows(variant, resources):
            assert row in report
        assert resources["weight_reduction_percent"] > 0  # packed weights are smaller, never larger
        assert resources["parameters"][0] == resources["parameters"][1] > 250_000
        assert resources["decode_ms"][0] > 0 and resources["decode_ms"][1] > 0
        # The latency in the report is the side-by-side run's, for both variants.
        paired = saved["models"]["stories"]["paired_latency"]
        assert resources["latency_side_by_side"]
        assert resources["decode_ms"] == [paired["unquantized"]["decode_ms_per_token_median"],
                                          paired[variant]["decode_ms_per_token_median"]]
        lo, hi = resources["decode_ratio_ci95"]
        assert lo <= hi and lo > 0
        assert resources["decode_verdict"] in ("faster", "slower", "no clear difference", "withheld")
        assert set(resources["decode_load"]) >= {"other_cpu_share", "steal_share", "loadavg_before", "busy"}
        assert f"[x{lo:.2f}, x{hi:.2f}]" in report
        # brecq's C++ decoder is the default path on the CPU; transformers is timed beside it.
        assert paired[variant]["environment"]["decode_path"] == "brecq C++ runtime"
        assert paired[variant + " (transformers)"]["environment"]["decode_path"] == "transformers"
    paths = analysis["decode_paths"]
    assert set(paths) == {"unquantized", "BRECQ W4/W6"}
    for variant, d in paths.items():
        paired = saved["models"]["stories"]["paired_latency"]
        assert d["default_ms"][0] == paired[variant]["decode_ms_per_token_median"]
        assert d["transformers_ms"][0] == paired[variant + " (transformers)"]["decode_ms_per_token_median"]
        assert d["ratio_ci95"][0] <= d["ratio"] <= d["ratio_ci95"][1]
        assert f"| {variant} | brecq C++ runtime | {d['default_ms'][0]:.2f}" in report
    for finding in analysis["conclusions"]["findings"]:
        assert finding in report
    assert {p.name for p in (out / "plots").iterdir()} >= {"accuracy.png", "resources.png", "blocks.png"}
    assert results["models"]["stories"]["variants"]["BRECQ W4/W6"]["quantization"]["recipe"]["name"] == "w4g64_mix_attn6"

    # A second run reuses everything: same numbers, no new quantization.
    before = {p: p.stat().st_mtime_ns for p in (out / "quantized").rglob("model.safetensors")}
    again = run_study(config, show_progress=False)
    assert again["analysis"]["models"]["stories"]["comparisons"] == saved["analysis"]["models"]["stories"]["comparisons"]
    assert again["models"]["stories"]["paired_latency"] == saved["models"]["stories"]["paired_latency"]  # cached
    assert {p: p.stat().st_mtime_ns for p in (out / "quantized").rglob("model.safetensors")} == before
    assert again["models"]["stories"]["variants"]["BRECQ W4/W6"]["measure"] == \
        saved["models"]["stories"]["variants"]["BRECQ W4/W6"]["measure"]  # cached, timings included
    for variant in saved["models"]["stories"]["variants"].values():
        assert variant["measure"]["latency"]["environment"]["attention"] == "brecq_sdpa"  # the defaults
        assert variant["measure"]["latency"]["environment"]["rms_norm"] == "brecq_ext"
    assert "attention brecq_sdpa, RMS norms brecq_ext" in report

    # Other measurement settings time again (and other kernels evaluate again); nothing is requantized.
    sdpa = _config(tmp_path).read_text().replace("seed = 0", 'seed = 0\nattention = "sdpa"\nfused_norms = false')
    (tmp_path / "sdpa.toml").write_text(sdpa)
    third = run_study(load_study_config(tmp_path / "sdpa.toml"), show_progress=False)
    for label, variant in third["models"]["stories"]["variants"].items():
        assert variant["measure"]["latency"]["environment"]["attention"] == "sdpa"
        assert variant["measure"]["latency"]["environment"]["rms_norm"] == "model's own"
        assert variant["measure"]["latency"] != saved["models"]["stories"]["variants"][label]["measure"]["latency"]
        for name, result in variant["datasets"].items():
            assert result["study_settings"]["attention"] == "sdpa" and not result["study_settings"]["fused_norms"]
            # float32 kernels differ from transformers' ops by rounding only: the same answers
            first = saved["models"]["stories"]["variants"][label]["datasets"][name]
            assert result["metrics"] == first["metrics"], (label, name)
    assert third["models"]["stories"]["paired_latency"]["unquantized"]["environment"]["attention"] == "sdpa"
    assert {p: p.stat().st_mtime_ns for p in (out / "quantized").rglob("model.safetensors")} == before


# (text of the working config, its replacement, the error that must name the entry)
BAD_CONFIGS = [
    pytest.param('role = "base"', 'role = "chat"', r"\[\[models\]\] 'stories': role must be one of", id="role"),
    pytest.param("test-ai2_arc.parquet", "nope.parquet", r"\[\[datasets\]\] #1: .*nope.parquet does not exist",
                 id="dataset-path"),
    pytest.param(str(STORIES260K), "/nonexistent/model", r"model path /nonexistent/model does not exist$",
                 id="model-path"),
    pytest.param(str(STORIES260K), "./models/x", r"model path .*models/x does not exist$", id="relative-model-path"),
    pytest.param("limit = 24", "limt = 24", r"\[\[datasets\]\] #1: unknown key 'limt'; did you mean 'limit'\?",
                 id="unknown-key-limt"),
    pytest.param("repeats = 1", "repets = 1", r"\[measure\]: unknown key 'repets'; did you mean 'repeats'\?",
                 id="unknown-key-repets"),
    pytest.param("iters = 20", "itres = 20", r"\[\[variants\]\] #1: unknown key 'itres'; did you mean 'iters'\?",
                 id="unknown-key-itres"),
    pytest.param("samples = 8", "sample = 8", r"calibration: unknown key 'sample'; did you mean 'samples'\?",
                 id="unknown-key-calibration"),
    pytest.param("[measure]", "[measur]", r"unknown section 'measur'; did you mean 'measure'\?", id="unknown-section"),
    pytest.param("repeats = 1", 'repeats = "three"', r"\[measure\]: 'repeats' must be an integer >= 1, got 'three'",
                 id="repeats-string"),
    pytest.param("repeats = 1", "repeats = 0", r"\[measure\]: 'repeats' must be >= 1, got 0", id="repeats-zero"),
    pytest.param("iters = 20", 'iters = "lots"', r"'BRECQ W4/W6': 'iters' must be an integer >= 1, got 'lots'",
                 id="iters-string"),
    pytest.param("iters = 20", "iters = 20\nlr = -1.0", r"'lr' must be a positive number, got -1.0", id="lr-negative"),
    pytest.param("samples = 8", "samples = 8.5", r"'samples' must be an integer >= 1, got 8.5", id="samples-float"),
    pytest.param("seed = 0", 'seed = 0\nfused_norms = "yes"', r"\[study\]: fused_norms must be true or false, got 'yes'",
                 id="fused-norms"),
    pytest.param("seed = 0", 'seed = 0\nattention = "flash"', r"\[study\]: attention must be one of \['brecq_sdpa', 'sdpa'\]",
                 id="attention"),
    pytest.param('recipe = "w4g64_mix_attn6"', 'recipe = "w5"', "unknown recipe 'w5'", id="recipe"),
]


@pytest.mark.parametrize("old,new,error", BAD_CONFIGS)
def test_config_errors_name_the_entry(tmp_path, old, new, error):
    require_shared(STORIES260K)
    text = _config(tmp_path).read_text()
    assert old in text
    (tmp_path / "bad.toml").write_text(text.replace(old, new))
    with pytest.raises(StudyConfigError, match=error):
        load_study_config(tmp_path / "bad.toml")


def test_a_hub_id_is_a_model_path(tmp_path):
    require_shared(STORIES260K)
    hub = _config(tmp_path).read_text().replace(str(STORIES260K), "Qwen/Qwen3-0.6B")
    (tmp_path / "hub.toml").write_text(hub)
    assert load_study_config(tmp_path / "hub.toml").models[0].path == "Qwen/Qwen3-0.6B"


def test_demo_reading_items_are_extractive_with_a_third_unanswerable():
    from brecq.demo.synthetic import squad_items

    items = squad_items(300, seed=4)
    assert items == squad_items(300, seed=4)  # seeded
    for i, item in enumerate(items):
        person = item["question"].removeprefix("What does ").removesuffix(" have?")
        assert person in item["context"]
        if i % 3 == 2:
            assert item["answer"] == "" and " has " not in item["context"]
        else:
            assert item["answer"] and f"{person} has {item['answer']}." in item["context"]
    with_two_sentences = sum(item["context"].count(".") == 2 for item in items)
    assert 60 < with_two_sentences < 140  # about half of the answerable 200


def test_offline_demo_runs_every_stage(tmp_path):
    from brecq.demo.study import run_demo_study

    results = run_demo_study(tmp_path / "demo", iters=5, base_steps=5, finetune_steps=5, show_progress=False)
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "What this is." in report and "synthetic" in report
    assert set(results["analysis"]["models"]) == {"demo-base", "demo-fine-tuned"}
    tasks = {r["task"] for m in results["models"].values() for v in m["variants"].values() for r in v["datasets"].values()}
    assert tasks == {"arc", "squad"}  # ARC-style by log-likelihood for both models
    # A rerun reuses the trained models instead of training again.
    again = run_demo_study(tmp_path / "demo", iters=5, base_steps=5, finetune_steps=5, show_progress=False)
    assert "reused" in json.dumps(again["reused"]) or again["reused"]
    trained = json.loads((tmp_path / "demo" / "work" / "trained.json").read_text())
    assert trained["key"]["base_steps"] == 5


@pytest.mark.parametrize("verdict, ci, wording", [
    ("faster", [0.75, 0.85], "decodes faster than the unquantized model (time per token x0.80, 95 % interval x0.75"),
    ("no clear difference", [0.95, 1.06], "shows no clear difference in decode speed"),
    ("slower", [1.15, 1.25], "decodes slower than the unquantized model"),
    ("withheld", [0.75, 0.85], "no verdict on decode speed, the machine was busy while it was timed (other processes")])
def test_conclusion_wording_of_decode_speed(verdict, ci, wording):
    per_model = {"comparisons": [{"variant": "W4", "verdict": "tie", "difference_ci95_points": [-1.0, 1.5],
                                  "n": 200, "dataset": "arc", "metric": "accuracy"}],
                 "resources": {"W4": {"weight_mib": [4.0, 1.0], "decode_ratio": 0.8, "decode_ratio_ci95": ci,
                                      "decode_verdict": verdict,
                                      "decode_load": {"busy": verdict == "withheld",
                                                      "reason": "other processes used 60 % of the CPUs"}}}}
    out = _conclusions("model", per_model)
    assert any(wording in line for line in out["findings"]), out["findings"]
    if verdict == "withheld":
        assert "no verdict" in out["recommendations"][0]


def test_uninformative_comparisons_support_no_conclusion():
    from brecq.study.report import verdict

    assert verdict({"uninformative": True, "ci95_points": [-2.0, 2.0], "difference_points": 0.0}, True) \
        == "uninformative"
    per_model = {"comparisons": [{"variant": "W4", "verdict": "uninformative", "difference_ci95_points": [-2.0, 2.0],
                                  "n": 150, "dataset": "squad", "metric": "exact_match"}],
                 "resources": {"W4": {"weight_mib": [4.0, 1.0], "decode_ratio": 0.8}}}
    out = _conclusions("model", per_model)
    assert any("cannot tell" in line for line in out["findings"]), out
    assert not any("no significant" in line for line in out["findings"] + out["recommendations"]), out
