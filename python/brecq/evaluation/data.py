"""ARC and SQuAD v2 items from parquet, in the study's layout or the Hugging Face layout.

The layout is detected from the columns. A file that fits neither layout is refused with the
missing or unexpected columns named; a row that cannot be parsed is reported with its row number
and counted in ``LoadReport.skipped``, never silently dropped or guessed.
"""
from __future__ import annotations

import ast
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..io import read_parquet

log = logging.getLogger("brecq")


@dataclass(frozen=True)
class ArcItem:
    id: str
    question: str  # the stem, without options
    labels: tuple[str, ...]  # option labels as written: "A".."E" or "1".."4"
    options: tuple[str, ...]
    answer_index: int


@dataclass(frozen=True)
class SquadItem:
    id: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...]  # empty: unanswerable

    @property
    def answerable(self) -> bool:
        return len(self.answers) > 0


@dataclass
class LoadReport:
    path: str
    layout: str
    rows: int
    loaded: int
    skipped: list = field(default_factory=list)  # (row number, reason)
    sampled_from: int | None = None  # rows available before a sample limit

    def describe(self) -> dict:
        return {"path": self.path, "layout": self.layout, "rows": self.rows, "loaded": self.loaded,
                "skipped": len(self.skipped), "skipped_rows": self.skipped[:20], "sampled_from": self.sampled_from}


LAYOUTS = {
    "arc_study": {"title", "question", "answer"},
    "arc_hf": {"question", "choices", "answerKey"},
    "squad_study": {"title", "context", "question", "answer"},
    "squad_hf": {"context", "question", "answers"},
}
OPTIONAL = {"arc_hf": {"id"}, "squad_hf": {"id", "title"}, "arc_study": set(), "squad_study": set()}


def detect_layout(columns, task: str) -> str:
    """``arc_study``, ``arc_hf``, ``squad_study`` or ``squad_hf`` from the column names."""
    cols = set(columns)
    candidates = [name for name in LAYOUTS if name.startswith(task)]
    for name in candidates:
        if LAYOUTS[name] <= cols and not (cols - LAYOUTS[name] - OPTIONAL[name]):
            return name
    described = "; ".join(f"{name}: missing {sorted(LAYOUTS[name] - cols)}, unexpected "
                          f"{sorted(cols - LAYOUTS[name] - OPTIONAL[name])}" for name in candidates)
    raise ValueError(f"columns {sorted(cols)} fit no {task.upper()} layout ({described})")


def _struct(value):
    """HF nested columns arrive as dicts (or, in some exports, as their repr string)."""
    if isinstance(value, str):
        return ast.literal_eval(value)
    return value


_OPTION_MARK = re.compile(r"(?:^|\s)([A-E]|[1-5])[.)]\s")


def split_inline_options(text: str) -> tuple[str, list[str], list[str]]:
    """'Stem? A. one B. two C. three' -> ('Stem?', ['A', 'B', 'C'], ['one', 'two', 'three']).
    Options must run in order from A (or 1); raises ValueError when they cannot be found."""
    for first, alphabet in (("A", "ABCDE"), ("1", "12345")):
        marks = []
        search_from = 0
        for label in alphabet:
            pattern = re.compile(rf"(?:^|\s){label}[.)]\s")
            match = pattern.search(text, search_from)
            if not match:
                break
            marks.append((label, match.start(), match.end()))
            search_from = match.end()
        if len(marks) >= 2:
            stem = text[:marks[0][1]].strip()
            options = [text[end:(marks[i + 1][1] if i + 1 < len(marks) else len(text))].strip()
                       for i, (_, _, end) in enumerate(marks)]
            if stem and all(options):
                return stem, [m[0] for m in marks], options
    raise ValueError("options 'A. ... B. ...' (or '1. ... 2. ...') not found in the question")


def _load(path, task: str, parse_row, limit, seed):
    """Rows of a parquet file through ``parse_row(row, index, layout)``; a row it cannot parse is
    reported with its number and the reason, and skipped."""
    path = Path(path)
    table = read_parquet(path)
    layout = detect_layout(table.column_names, task)
    rows = table.to_pylist()
    items, report = [], LoadReport(str(path), layout, len(rows), 0)
    for i, row in enumerate(rows):
        try:
            items.append(parse_row(row, i, layout))
        except (ValueError, KeyError, SyntaxError, TypeError) as exc:
            report.skipped.append((i, str(exc)))
            log.warning("%s row %d skipped: %s", path.name, i, exc)
    return _limit(items, report, limit, seed)


def _arc_row(row: dict, i: int, layout: str) -> ArcItem:
    if layout == "arc_study":
        stem, labels, options = split_inline_options(str(row["question"]))
        answer, item_id = str(row["answer"]).strip(), str(row.get("title") or i)
    else:
        choices = _struct(row["choices"])
        labels, options = [str(x) for x in choices["label"]], [str(x) for x in choices["text"]]
        stem, answer, item_id = str(row["question"]).strip(), str(row["answerKey"]).strip(), str(row.get("id") or i)
    if answer not in labels:
        raise ValueError(f"answer {answer!r} is not among the option labels {labels}")
    return ArcItem(item_id, stem, tuple(labels), tuple(options), labels.index(answer))


def _squad_row(row: dict, i: int, layout: str) -> SquadItem:
    if layout == "squad_study":
        answer = row["answer"]
        if answer is None:
            raise ValueError("answer is null (use an empty string for unanswerable)")
        answers = (str(answer),) if str(answer).strip() else ()
        item_id = f"{row.get('title') or 'row'}-{i}"
    else:
        answers = tuple(str(a) for a in _struct(row["answers"])["text"] if str(a).strip())
        item_id = str(row.get("id") or i)
    context, question = str(row["context"]), str(row["question"])
    if not context.strip() or not question.strip():
        raise ValueError("empty context or question")
    return SquadItem(item_id, str(row.get("title") or ""), context, question, answers)


def load_arc(path, limit: int | None = None, seed: int = 0) -> tuple[list[ArcItem], LoadReport]:
    return _load(path, "arc", _arc_row, limit, seed)


def load_squad(path, limit: int | None = None, seed: int = 0) -> tuple[list[SquadItem], LoadReport]:
    return _load(path, "squad", _squad_row, limit, seed)


def _limit(items, report: LoadReport, limit, seed):
    if limit is not None and limit < len(items):
        report.sampled_from = len(items)
        items = [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]
    report.loaded = len(items)
    return items, report
