"""Run an evaluation task and write its per-example records and aggregate, atomically."""
from __future__ import annotations

import enum
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from ..io import atomic_write_text
from .data import load_arc, load_squad
from .metrics import (
    bootstrap_interval,
    mcnemar_p_value,
    paired_bootstrap_difference,
    paired_proportion_difference,
    wilson_interval,
)
from .tasks import (
    Record,
    apply_chat,
    arc_context,
    arc_generative_prompt,
    prompt_hash,
    score_arc_generative,
    score_arc_loglikelihood,
    score_squad,
    squad_prompt,
)

log = logging.getLogger("brecq")


class Task(enum.Enum):
    ARC = "arc"  # log-likelihood multiple choice (base models)
    ARC_GENERATIVE = "arc_gen"  # prompted with options, greedy answer letter (chat / fine-tuned models)
    SQUAD = "squad"  # generative SQuAD v2


def _binary(values) -> dict:
    n = len(values)
    value = sum(values) / n if n else float("nan")
    lo, hi = wilson_interval(sum(values), n)
    return {"n": n, "value": value, "ci95": [lo, hi], "interval": "wilson"}


def _mean(values) -> dict:
    n = len(values)
    lo, hi = bootstrap_interval(values)
    return {"n": n, "value": sum(values) / n if n else float("nan"), "ci95": [lo, hi], "interval": "bootstrap"}


def aggregate(task: Task, records: list[Record]) -> dict:
    if task is Task.ARC:
        return {"acc": _binary([r.correct for r in records]),
                "acc_norm": _binary([r.score["acc_norm"] for r in records])}
    if task is Task.ARC_GENERATIVE:
        return {"acc": _binary([r.correct for r in records]),
                "unparsed_rate": _binary([0.0 if r.score["parsed"] else 1.0 for r in records])}
    has = [r for r in records if r.score["has_answer"]]
    no = [r for r in records if not r.score["has_answer"]]
    return {"exact_match": _binary([r.correct for r in records]), "f1": _mean([r.score["f1"] for r in records]),
            "has_ans_exact_match": _binary([r.correct for r in has]), "has_ans_f1": _mean([r.score["f1"] for r in has]),
            "no_ans_exact_match": _binary([r.correct for r in no])}


PARTIAL = "records.partial.jsonl"
CHUNK = 32  # examples scored between two appends to the journal


def _prompt(task: Task, item, tokenizer, chat: bool) -> str:
    if task is Task.ARC:
        return arc_context(item)
    if task is Task.ARC_GENERATIVE:
        return apply_chat(tokenizer, arc_generative_prompt(item), chat)
    return apply_chat(tokenizer, squad_prompt(item), chat)


def _journal(path: Path, key) -> dict:
    """Records already scored (a journal cut short by a kill loses at most its last line). A journal
    begun under another ``key`` (another model, dataset or setting) is discarded, never resumed."""
    done = {}
    if not path.exists():
        return done
    lines = path.read_text().splitlines()
    first = None
    if lines:
        try:
            first = json.loads(lines[0])
        except json.JSONDecodeError:
            first = None
    if not isinstance(first, dict) or first.get("journal_key") != key:
        log.info("%s was begun for another model, dataset or setting: starting afresh", path)
        path.unlink()
        return done
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "id" in record:
            done[record["id"]] = record
    return done


def _journals(out: Path, key) -> dict:
    """Records of every journal in ``out``: the one-process journal and each rank's of a run under
    torchrun (any number of ranks: a rerun with another count resumes them all)."""
    done: dict = {}
    for path in sorted(out.glob("records.partial*.jsonl")):
        done.update(_journal(path, key))
    return done


def _journal_path(out: Path, rank: int, size: int) -> Path:
    return out / (PARTIAL if size == 1 else f"records.partial.rank{rank}.jsonl")


def journal_header(task: Task, data_path, limit, seed, chat, max_new_tokens, journal_key=None) -> dict:
    """The first line of an evaluation journal: what its records belong to."""
    key = {"task": task.value, "data": str(data_path), "limit": limit, "seed": seed, "chat": chat,
           "max_new_tokens": max_new_tokens, "caller": journal_key}
    return {"journal_key": json.loads(json.dumps(key, default=str))}  # as it reads back from the file


def evaluate(model, tokenizer, task: Task, data_path, out_dir=None, *, limit: int | None = None, seed: int = 0,
             chat: bool = False, batch_size: int = 8, max_new_tokens: int | None = None,
             show_progress: bool = True, label: str = "", journal_key=None) -> dict:
    """Evaluate ``model`` on a parquet file; returns the aggregate (also written to
    ``out_dir/results.json`` with the per-example records in ``out_dir/records.jsonl``).

    With ``out_dir``, scored examples are journaled as they finish; an interrupted run resumes,
    reusing the records whose prompt is unchanged, if the journal was begun under the same
    ``journal_key`` (JSON-able: what identifies the model, data and settings; the study passes its
    cache key). The task, data file, limit, seed, chat setting and generation length always count.

    Under torchrun (torch.distributed initialised), every rank calls this with its own copy of the
    model: ranks take chunks of examples in turn, journal them to ``records.partial.rank<R>.jsonl``,
    and every rank returns the same result; rank 0 writes the files, with the same records in the
    same order as one process would. A rerun, with any number of ranks, resumes every journal."""
    from ..distributed import agree, all_gather, broadcast, world

    w = world()
    loader = load_squad if task is Task.SQUAD else load_arc
    items, report = loader(data_path, limit=limit, seed=seed)
    if not items:
        raise ValueError(f"{data_path}: no usable examples ({len(report.skipped)} rows could not be parsed)")
    out = Path(out_dir) if out_dir is not None else None
    key = journal_header(task, data_path, limit, seed, chat, max_new_tokens, journal_key)["journal_key"]
    # Rank 0 reads the journals and every rank takes its word, so all agree on what is left to do.
    cached = broadcast(_journals(out, key) if out is not None and w.is_main else {})
    hashes = {item.id: prompt_hash(_prompt(task, item, tokenizer, chat)) for item in items}
    done = {i: Record(**r) for i, r in cached.items() if i in hashes and r["prompt_sha"] == hashes[i]}
    todo = [item for item in items if item.id not in done]
    journal = _journal_path(out, w.rank, w.size) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if done and w.is_main:
            log.info("%s: reusing %d scored examples", out, len(done))
    # Examples are scored in chunks (sorted by length and batched within a chunk), and ranks take
    # whole chunks in turn, so each example meets the same batch as in one process.
    chunks = [todo[start:start + CHUNK] for start in range(0, len(todo), CHUNK)]
    mine: list[Record] = []
    started = time.perf_counter()
    error = None
    try:
        for chunk in chunks[w.rank::w.size]:
            progress = show_progress and w.is_main
            if task is Task.ARC:
                records = score_arc_loglikelihood(model, tokenizer, chunk, batch_size, progress)
            elif task is Task.ARC_GENERATIVE:
                records = score_arc_generative(model, tokenizer, chunk, chat, max_new_tokens or 16, batch_size,
                                               progress)
            else:
                records = score_squad(model, tokenizer, chunk, chat, max_new_tokens or 32, batch_size, progress)
            mine += records
            if journal is not None:
                fresh = not journal.exists()
                with open(journal, "a", encoding="utf-8") as f:
                    if fresh:
                        f.write(json.dumps({"journal_key": key}) + "\n")  # = journal_header(...)
                    f.write("".join(json.dumps(asdict(r)) + "\n" for r in records))
                    f.flush()
                    os.fsync(f.fileno())
    except Exception as exc:  # every rank stops, and nothing below is written
        error = exc
    agree(error, f"evaluation of {label or task.value} on {Path(data_path).name}")
    gathered = all_gather(([asdict(r) for r in mine], time.perf_counter() - started))
    for records, _ in gathered:
        for r in records:
            done[r["id"]] = Record(**r)
    seconds = max(elapsed for _, elapsed in gathered)  # the slowest rank's wall time
    records = [done[item.id] for item in items]
    result = {"task": task.value, "label": label, "data": report.describe(), "n": len(records),
              "metrics": aggregate(task, records),
              "settings": {"limit": limit, "seed": seed, "chat_template": chat, "batch_size": batch_size,
                           "max_new_tokens": max_new_tokens},
              "seconds": seconds, "scored_now": len(todo), "reused": len(items) - len(todo),
              "examples_per_second": len(todo) / seconds if seconds > 0 and todo else None,
              "processes": w.size}
    if out is not None:
        if w.is_main:
            atomic_write_text(out / "records.jsonl", "".join(json.dumps(asdict(r)) + "\n" for r in records))
            atomic_write_text(out / "results.json", json.dumps(result, indent=2))
            for path in out.glob("records.partial*.jsonl"):
                path.unlink(missing_ok=True)
        agree(None, "evaluation")  # no rank moves on before the results are written
    if w.is_main:
        log.info("%s on %s: %s", task.value, Path(data_path).name,
                 {k: round(v["value"], 4) for k, v in result["metrics"].items()})
    return result


def read_records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def compare(records_a: list[dict], records_b: list[dict], field: str = "correct", binary: bool = True) -> dict:
    """Paired comparison of two runs on the same examples (matched by id; prompts must agree):
    difference b - a in points with a 95 % interval valid for paired data (Tango's score interval
    for binary outcomes, a paired bootstrap for continuous scores such as F1), McNemar's p for
    binary outcomes, and ``uninformative`` when both runs sit at the metric's floor or ceiling on
    every example (a tie there says nothing about the difference)."""
    by_id = {r["id"]: r for r in records_a}
    pairs = []
    for r in records_b:
        other = by_id.get(r["id"])
        if other is None:
            continue
        if other["prompt_sha"] != r["prompt_sha"]:
            raise ValueError(f"compare: example {r['id']} was prompted differently in the two runs")
        pick = (lambda rec: rec[field]) if field == "correct" else (lambda rec: rec["score"][field])
        pairs.append((float(pick(other)), float(pick(r))))
    if not pairs:
        raise ValueError("compare: the runs share no examples")
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    if binary:
        diff, (lo, hi) = paired_proportion_difference([x > 0.5 for x in a], [y > 0.5 for y in b])
    else:
        diff, (lo, hi) = paired_bootstrap_difference(a, b)
    values = set(a) | set(b)
    out = {"n": len(pairs), "a": sum(a) / len(a), "b": sum(b) / len(b), "difference_points": 100 * diff,
           "ci95_points": [100 * lo, 100 * hi], "interval": "tango" if binary else "paired bootstrap",
           "uninformative": values == {0.0} or values == {1.0}}
    if binary:
        out["mcnemar_p"] = mcnemar_p_value(a, b)
        out["discordant"] = [sum(1 for x, y in pairs if x and not y), sum(1 for x, y in pairs if y and not x)]
    return out
