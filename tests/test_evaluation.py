import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from brecq.evaluation import data, metrics, tasks
from brecq.evaluation.perplexity import perplexity, token_stream
from brecq.evaluation.runner import Task, compare, evaluate, journal_header, read_records
from conftest import DATA, STORIES260K, require_shared


# --- metrics -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [("The  Cat, sat!", "cat sat"), ("an apple a day", "apple day"),
                                           ("  ", ""), ("Théâtre (1999)", "théâtre 1999")])
def test_squad_normalisation(text, expected):
    assert metrics.normalize_answer(text) == expected


def test_exact_match_and_f1_take_the_best_gold_answer():
    assert metrics.squad_scores("the Eiffel Tower", ["Eiffel Tower", "tower"]) == (1.0, 1.0)
    em, f1 = metrics.squad_scores("Eiffel", ["Eiffel Tower", "the tower in Paris"])
    assert em == 0.0 and f1 == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    # Unanswerable: only the empty answer is right.
    assert metrics.squad_scores("", []) == (1.0, 1.0)
    assert metrics.squad_scores("Paris", []) == (0.0, 0.0)
    assert metrics.squad_scores("", ["Paris"]) == (0.0, 0.0)


@pytest.mark.parametrize("text,choice", [
    ("B", "B"), ("B.", "B"), (" (C) because", "C"), ("The answer is D", "D"), ("answer: (A)", "A"),
    ("**Answer: B**", "B"), ("I think it is C, the moon", "C"), ("A or B", None), ("none of these", None),
    ("Answer is E", None), ("", None), ("Because the Earth rotates. B", "B")])
def test_letter_extraction(text, choice):
    assert metrics.extract_choice(text, ["A", "B", "C", "D"]) == choice


def test_letter_extraction_with_digit_labels():
    assert metrics.extract_choice("2. the second one", ["1", "2", "3", "4"]) == "2"
    assert metrics.extract_choice("12 apples", ["1", "2", "3", "4"]) is None


def test_wilson_interval_known_values():
    lo, hi = metrics.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = metrics.wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)


def test_mcnemar_exact_p_value():
    a = [1] * 9 + [0] * 1 + [1] * 5
    b = [0] * 9 + [1] * 1 + [1] * 5
    assert metrics.mcnemar_p_value(a, b) == pytest.approx(22 / 1024)
    assert metrics.mcnemar_p_value([1, 0], [1, 0]) == 1.0


def test_paired_bootstrap_interval_brackets_the_difference():
    a = [1, 0, 1, 1, 0, 1, 0, 1] * 10
    b = [1, 1, 1, 1, 0, 1, 1, 1] * 10
    diff, (lo, hi) = metrics.paired_bootstrap_difference(a, b)
    assert diff == pytest.approx(0.25)
    assert lo < diff < hi and lo > 0


def test_tango_interval_keeps_its_width_when_few_pairs_disagree():
    # One discordant pair in 200: the bootstrap said [+0.0, +1.5]; the score interval is wider.
    lo, hi = metrics.tango_paired_interval(0, 1, 200)
    assert float(lo) == pytest.approx(-0.0139, abs=5e-4) and float(hi) == pytest.approx(0.0278, abs=5e-4)
    lo, hi = metrics.tango_paired_interval(0, 0, 200)  # no disagreement: not [0, 0]
    assert float(hi) == pytest.approx(-float(lo)) and 0.015 < float(hi) < 0.025
    lo, hi = metrics.tango_paired_interval(0, 0, 5)  # five examples allow large differences
    assert float(hi) > 0.4
    diff, (lo, hi) = metrics.paired_proportion_difference([1, 0, 1, 1] * 25, [1, 1, 1, 1] * 25)
    assert diff == pytest.approx(0.25) and 0 < lo < diff < hi


@pytest.mark.parametrize("n", [20, 200, 2000])
@pytest.mark.parametrize("discordance", [0.0, 0.01, 0.03, 0.1])
@pytest.mark.parametrize("share_b", [0.5, 0.8], ids=["even", "b-ahead"])
def test_tango_interval_covers_at_small_and_large_n(n, discordance, share_b):
    """Nominal 95 %: the true difference inside the interval in at least 93 % of simulated studies."""
    rng = np.random.default_rng(n + int(1000 * discordance) + int(10 * share_b))
    p_b_only, p_a_only = discordance * share_b, discordance * (1 - share_b)
    tables = rng.multinomial(n, [p_a_only, p_b_only, 1 - discordance], size=4000)
    lo, hi = metrics.tango_paired_interval(tables[:, 0], tables[:, 1], n)
    truth = p_b_only - p_a_only
    coverage = float(((lo <= truth + 1e-12) & (truth - 1e-12 <= hi)).mean())
    assert coverage >= 0.93, coverage


def test_bootstrap_handles_a_squad_dev_sized_set():
    values = np.random.default_rng(0).random(11873)
    lo, hi = metrics.bootstrap_interval(values)
    half = 1.96 * values.std() / np.sqrt(values.size)
    assert lo < values.mean() < hi and (hi - lo) / 2 == pytest.approx(half, rel=0.15)


def test_compare_calls_floor_and_ceiling_uninformative():
    rows = [{"id": str(i), "prompt_sha": "p", "correct": 0.0, "score": {"f1": 0.0}} for i in range(150)]
    cmp = compare(rows, rows)
    assert cmp["uninformative"] and cmp["interval"] == "tango" and cmp["ci95_points"][1] > 0
    assert compare(rows, rows, "f1", binary=False)["uninformative"]
    mixed = [dict(r, correct=float(i % 2)) for i, r in enumerate(rows)]
    assert not compare(mixed, mixed)["uninformative"]


# --- data ----------------------------------------------------------------------------------------
def test_inline_option_parsing():
    stem, labels, options = data.split_inline_options("Which is a gas? A. ice B. steam C. rock D. wood")
    assert stem == "Which is a gas?" and labels == ["A", "B", "C", "D"]
    assert options == ["ice", "steam", "rock", "wood"]
    with pytest.raises(ValueError, match="options"):
        data.split_inline_options("No options here at all")


def test_both_arc_layouts_load():
    items, report = data.load_arc(require_shared(DATA / "test-ai2_arc.parquet"))
    assert report.layout == "arc_study" and report.rows == 200
    assert report.loaded + len(report.skipped) == 200 and report.loaded >= 190
    assert all(0 <= it.answer_index < len(it.options) for it in items)
    hf, hf_report = data.load_arc(require_shared(DATA / "arc_challenge_hf_sample.parquet"))
    assert hf_report.layout == "arc_hf" and len(hf) == 50
    assert hf[0].labels[hf[0].answer_index] in hf[0].labels


def test_both_squad_layouts_load_with_unanswerable_counts():
    items, report = data.load_squad(require_shared(DATA / "test-squad_v2.parquet"))
    assert report.layout == "squad_study" and len(items) == 200
    assert sum(not it.answerable for it in items) == 98
    hf, _ = data.load_squad(require_shared(DATA / "squad_v2_hf_sample.parquet"))
    assert len(hf) == 60 and sum(not it.answerable for it in hf) == 35


def test_sample_limit_is_seeded_and_reported():
    a, report = data.load_arc(require_shared(DATA / "test-ai2_arc.parquet"), limit=20, seed=3)
    b, _ = data.load_arc(require_shared(DATA / "test-ai2_arc.parquet"), limit=20, seed=3)
    assert [x.id for x in a] == [x.id for x in b] and report.loaded == 20 and report.sampled_from >= 190


def test_file_of_neither_layout_names_the_columns(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["x"], "label": ["A"]}), path)
    with pytest.raises(ValueError, match=r"fit no ARC layout .*missing \['answer', 'question', 'title'\]"):
        data.load_arc(path)


def test_unparseable_rows_are_reported_with_their_row_number(tmp_path):
    path = tmp_path / "arc.parquet"
    pq.write_table(pa.table({"title": ["a", "b", "c"],
                             "question": ["Q1? A. x B. y", "Q2 without options", "Q3? A. x B. y"],
                             "answer": ["B", "A", "E"]}), path)
    items, report = data.load_arc(path)
    assert [i.id for i in items] == ["a"]
    assert [row for row, _ in report.skipped] == [1, 2]
    assert "not among the option labels" in report.skipped[1][1]


def test_malformed_parquet_is_refused(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        data.load_squad(path)


# --- scorers wired to stub models ---------------------------------------------------------------
def _arc_items():
    items, _ = data.load_arc(require_shared(DATA / "test-ai2_arc.parquet"), limit=60, seed=0)
    return items


def test_scorer_with_a_model_that_prefers_the_gold_option(monkeypatch):
    items = _arc_items()
    gold = {(tasks.arc_context(it), f" {it.options[it.answer_index]}") for it in items}
    monkeypatch.setattr(tasks, "loglikelihoods", lambda m, t, pairs, *a: [0.0 if p in gold else -5.0 for p in pairs])
    records = tasks.score_arc_loglikelihood(None, None, items)
    assert all(r.correct == 1.0 and r.score["acc_norm"] == 1.0 for r in records)


def test_scorer_with_a_model_that_prefers_the_first_option(monkeypatch):
    items = _arc_items()
    first = {(tasks.arc_context(it), f" {it.options[0]}") for it in items}
    monkeypatch.setattr(tasks, "loglikelihoods", lambda m, t, pairs, *a: [0.0 if p in first else -5.0 for p in pairs])
    records = tasks.score_arc_loglikelihood(None, None, items)
    expected = sum(it.answer_index == 0 for it in items) / len(items)
    assert sum(r.correct for r in records) / len(records) == pytest.approx(expected)
    assert 0 < expected < 0.5


def test_generative_scorers_with_stub_generation(monkeypatch):
    items = _arc_items()
    answers = {tasks.arc_generative_prompt(it): f"The answer is {it.labels[it.answer_index]}." for it in items}
    monkeypatch.setattr(tasks, "generate", lambda m, t, prompts, *a: [answers[p] for p in prompts])
    records = tasks.score_arc_generative(None, None, items)
    assert all(r.correct == 1.0 and r.score["parsed"] for r in records)
    squad, _ = data.load_squad(require_shared(DATA / "test-squad_v2.parquet"), limit=40, seed=0)
    replies = {tasks.squad_prompt(it): (it.answers[0] if it.answers else "Unanswerable.") + "\nmore text" for it in squad}
    monkeypatch.setattr(tasks, "generate", lambda m, t, prompts, *a: [replies[p] for p in prompts])
    scored = tasks.score_squad(None, None, squad)
    assert all(r.correct == 1.0 and r.score["f1"] == 1.0 for r in scored)


# --- real model ----------------------------------------------------------------------------------
def _stories():
    transformers = pytest.importorskip("transformers")
    path = str(require_shared(STORIES260K))
    return (transformers.AutoModelForCausalLM.from_pretrained(path).eval(),
            transformers.AutoTokenizer.from_pretrained(path))


def test_stories260k_perplexity_is_close_to_its_known_figure():
    model, tok = _stories()
    from brecq.quantization.calibration import load_documents

    docs = load_documents(require_shared(DATA / "tinystories_val_head.txt"))
    result = perplexity(model, token_stream(tok, docs), window=256)
    assert result.tokens > 50_000
    assert 3.3 < result.perplexity < 4.6  # the data README: about 3.7 on the validation split


def test_batched_and_unbatched_runs_give_the_same_predictions(tmp_path):
    model, tok = _stories()
    arc = DATA / "test-ai2_arc.parquet"
    one = evaluate(model, tok, Task.ARC, arc, tmp_path / "one", limit=12, batch_size=1, show_progress=False)
    many = evaluate(model, tok, Task.ARC, arc, tmp_path / "many", limit=12, batch_size=7, show_progress=False)
    r1, r2 = read_records(tmp_path / "one" / "records.jsonl"), read_records(tmp_path / "many" / "records.jsonl")
    assert [r["prediction"] for r in r1] == [r["prediction"] for r in r2]
    assert one["metrics"]["acc"]["value"] == many["metrics"]["acc"]["value"]
    tok.pad_token = tok.pad_token or tok.unk_token
    squad = DATA / "test-squad_v2.parquet"
    g1 = evaluate(model, tok, Task.SQUAD, squad, tmp_path / "g1", limit=6, batch_size=1, max_new_tokens=8,
                  show_progress=False)
    g2 = evaluate(model, tok, Task.SQUAD, squad, tmp_path / "g2", limit=6, batch_size=6, max_new_tokens=8,
                  show_progress=False)
    p1 = [r["score"]["output"] for r in read_records(tmp_path / "g1" / "records.jsonl")]
    p2 = [r["score"]["output"] for r in read_records(tmp_path / "g2" / "records.jsonl")]
    assert p1 == p2
    assert g1["metrics"]["exact_match"]["n"] == g2["metrics"]["exact_match"]["n"] == 6


def test_results_and_paired_comparison_files(tmp_path):
    model, tok = _stories()
    result = evaluate(model, tok, Task.ARC, DATA / "test-ai2_arc.parquet", tmp_path / "a", limit=30,
                      show_progress=False)
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["metrics"]["acc"]["n"] == 30 and saved["data"]["loaded"] == 30
    lo, hi = saved["metrics"]["acc"]["ci95"]
    assert lo <= saved["metrics"]["acc"]["value"] <= hi
    assert 0.0 <= result["metrics"]["acc"]["value"] <= 0.6  # a 260K-parameter story model is near chance
    records = read_records(tmp_path / "a" / "records.jsonl")
    same = compare(records, records)
    assert same["difference_points"] == 0.0 and same["mcnemar_p"] == 1.0


def test_acc_and_acc_norm_differ_as_defined(monkeypatch):
    item = data.ArcItem("x", "Which is it?", ("A", "B"), ("a very long option text", "short"), 0)
    # The long option (A) wins on both: -12 > -13 summed, -12/24 > -13/6 per character.
    values = {" a very long option text": -12.0, " short": -13.0}
    monkeypatch.setattr(tasks, "loglikelihoods", lambda m, t, pairs, *a: [values[c] for _, c in pairs])
    (record,) = tasks.score_arc_loglikelihood(None, None, [item])
    assert record.prediction == "A" and record.correct == 1.0
    assert record.score["prediction_norm"] == "A" and record.score["acc_norm"] == 1.0
    values = {" a very long option text": -13.0, " short": -12.0}
    (record,) = tasks.score_arc_loglikelihood(None, None, [item])
    # acc picks B (-12 > -13); acc_norm picks A (-13/24 = -0.54 > -12/6 = -2.0).
    assert record.prediction == "B" and record.correct == 0.0
    assert record.score["prediction_norm"] == "A" and record.score["acc_norm"] == 1.0


def test_compare_command_line(tmp_path):
    import subprocess
    import sys

    rows_a = [{"id": str(i), "prompt_sha": "p", "prediction": "", "gold": "", "correct": float(i % 2), "score": {}}
              for i in range(40)]
    rows_b = [dict(r, correct=1.0) for r in rows_a]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_a))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_b))
    done = subprocess.run([sys.executable, "-m", "brecq.cli", "compare", str(tmp_path / "a.jsonl"),
                           str(tmp_path / "b.jsonl")], capture_output=True, text=True, cwd=tmp_path)
    result = json.loads(done.stdout)
    assert result["n"] == 40 and result["difference_points"] == pytest.approx(50.0)
    assert result["mcnemar_p"] == pytest.approx(2 / 2 ** 20)


def test_interrupted_evaluation_resumes_from_its_journal(tmp_path):
    model, tok = _stories()
    arc = DATA / "test-ai2_arc.parquet"
    full = evaluate(model, tok, Task.ARC, arc, tmp_path / "full", limit=20, show_progress=False)
    records = (tmp_path / "full" / "records.jsonl").read_text().splitlines()
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    # As a run killed after 12 examples leaves it: a journal, the last line cut short.
    header = json.dumps(journal_header(Task.ARC, arc, 20, 0, False, None, {"model": "m1"}))
    journal = "\n".join([header, *records[:12]]) + "\n" + records[12][:30]
    # Begun for another model: discarded, never resumed.
    (resumed_dir / "records.partial.jsonl").write_text(journal)
    other = evaluate(model, tok, Task.ARC, arc, resumed_dir, limit=20, show_progress=False,
                     journal_key={"model": "m2"})
    assert other["reused"] == 0 and other["scored_now"] == 20
    (resumed_dir / "records.partial.jsonl").write_text(journal)
    result = evaluate(model, tok, Task.ARC, arc, resumed_dir, limit=20, show_progress=False,
                      journal_key={"model": "m1"})
    assert result["reused"] == 12 and result["scored_now"] == 8
    # Same examples, same order, same predictions (log-likelihoods may differ in the last digits:
    # the batches are composed differently).
    resumed = [json.loads(line) for line in (resumed_dir / "records.jsonl").read_text().splitlines()]
    original = [json.loads(line) for line in records]
    assert [(r["id"], r["prediction"]) for r in resumed] == [(r["id"], r["prediction"]) for r in original]
    assert result["metrics"]["acc"] == full["metrics"]["acc"]
    assert not (resumed_dir / "records.partial.jsonl").exists()


# --- calibration ---------------------------------------------------------------------------------
def test_distinct_tokens_counts_the_union_of_windows():
    from brecq.quantization.calibration import distinct_tokens

    assert distinct_tokens([0, 10, 5], 10) == 20  # [0, 20)
    assert distinct_tokens([0, 100], 10) == 20
    assert distinct_tokens([3, 3, 3], 8) == 8


def test_calibration_warns_when_windows_overlap_heavily(caplog):
    import logging

    from transformers import AutoTokenizer

    from brecq.quantization.calibration import CalibrationSpec, build_calibration

    tokenizer = AutoTokenizer.from_pretrained(require_shared(STORIES260K))
    text = DATA / "tinystories_val_head.txt"
    stats: dict = {}
    with caplog.at_level(logging.WARNING, logger="brecq"):
        ids = build_calibration(tokenizer, CalibrationSpec(str(text), num_samples=8, seq_len=64), stats)
    assert ids.shape == (8, 64) and not caplog.records
    assert stats["requested_tokens"] == 512 and 256 <= stats["distinct_tokens"] <= 512
    stats = {}
    with caplog.at_level(logging.WARNING, logger="brecq"):
        build_calibration(tokenizer, CalibrationSpec(str(text), num_samples=1000, seq_len=512), stats)
    assert stats["distinct_tokens"] <= stats["stream_tokens"] < stats["requested_tokens"] == 512_000
    assert any("cover only" in r.getMessage() for r in caplog.records)


# --- per-window perplexity and KL, for paired comparisons ----------------------------------------
def _seeded_pair():
    import torch
    from brecq.models import build_model, small_config

    config = small_config("qwen3", 96, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=32)
    reference = build_model(config, 0).eval()
    other = build_model(config, 0).eval()
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(0.5)  # a perturbed copy
    return reference, other


@pytest.mark.parametrize("length,window,stride", [(301, 64, None), (256, 64, None), (200, 64, 48), (70, 64, None)],
                         ids=["short-last-window", "whole-windows", "overlapping", "one-and-a-bit"])
def test_per_window_nll_and_kl_add_up_to_the_totals_in_stream_order(length, window, stride):
    import torch
    from brecq.evaluation.fidelity import fidelity

    reference, other = _seeded_pair()
    ids = torch.randint(0, 96, (length,), generator=torch.Generator().manual_seed(length))
    result = perplexity(other, ids, window=window, stride=stride, batch_size=3)
    # Each token predicted at most once: all but the first with overlapping windows, all but each
    # window's first without.
    assert result.tokens == (length - 1 if stride else length - len(range(0, length - 1, window)))
    assert sum(result.window_tokens) == result.tokens
    weighted = sum(t * v for t, v in zip(result.window_tokens, result.window_nll)) / result.tokens
    assert weighted == pytest.approx(result.mean_nll, rel=1e-9)
    if stride is None:  # each window alone gives its own figure, in stream order
        for i, start in enumerate(range(0, length - 1, window)):
            alone = perplexity(other, ids[start:start + window], window=window)
            assert result.window_nll[i] == pytest.approx(alone.mean_nll, rel=1e-5)
        fid = fidelity(other, reference, ids, window=window, batch_size=3)
        starts = list(range(0, length - 1, window))
        assert len(fid.window_kl) == len(starts)
        sizes = [min(window, length - s) for s in starts]
        assert sum(k * n for k, n in zip(fid.window_kl, sizes)) / fid.tokens == pytest.approx(fid.mean_kl, rel=1e-6)
        for i, start in enumerate(starts):
            alone = fidelity(other, reference, ids[start:start + window], window=window)
            assert fid.window_kl[i] == pytest.approx(alone.mean_kl, rel=1e-5, abs=1e-9)
        assert max(fid.window_kl) > 0
