"""Calibration data: token windows drawn with a seed from parquet columns or text files."""
from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..evaluation.perplexity import document_ids

log = logging.getLogger("brecq")


@dataclass(frozen=True)
class CalibrationSpec:
    """``num_samples`` windows of ``seq_len`` tokens from ``path`` (parquet: the text of
    ``columns`` joined per row; text file: documents separated by blank lines)."""

    path: str
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    columns: tuple[str, ...] = ()
    chat_template: bool = False

    def __post_init__(self):
        if self.num_samples <= 0 or self.seq_len <= 1:
            raise ValueError(f"CalibrationSpec: num_samples must be > 0 and seq_len > 1, got "
                             f"{self.num_samples} and {self.seq_len}")
        object.__setattr__(self, "columns", tuple(self.columns))

    def describe(self) -> dict:
        d = asdict(self)
        d["columns"] = list(self.columns)
        d["file"] = Path(self.path).name
        return d


def load_documents(path: str | Path, columns=()) -> list[str]:
    """Texts of a parquet file (``columns`` joined with a blank line per row) or a text file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"calibration data not found: {path}")
    if path.suffix == ".parquet":
        from ..io import read_parquet

        table = read_parquet(path)
        if not columns:
            columns = tuple(name for name in table.column_names
                            if table.schema.field(name).type in ("string", "large_string"))
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise ValueError(f"{path}: calibration columns {missing} not found; the file has {table.column_names}")
        data = {c: table.column(c).to_pylist() for c in columns}
        docs = ["\n\n".join(str(data[c][i]) for c in columns if data[c][i]) for i in range(table.num_rows)]
    else:
        text = path.read_text(encoding="utf-8")
        docs = [d.strip() for d in text.split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"{path}: no calibration text found")
    return docs


def _chat_text(tokenizer, doc: str, columns) -> str:
    parts = doc.split("\n\n", 1)
    messages = [{"role": "user", "content": parts[0]}]
    if len(parts) > 1:
        messages.append({"role": "assistant", "content": parts[1]})
    return tokenizer.apply_chat_template(messages, tokenize=False)


# Windows drawn from a stream shorter than this share of the tokens they ask for overlap heavily:
# the calibration set is then smaller than it looks, and a warning says so.
MIN_DISTINCT_SHARE = 0.5


def distinct_tokens(starts: list[int], seq_len: int) -> int:
    """How many stream positions the windows ``[s, s + seq_len)`` cover together."""
    covered, end = 0, -1
    for start in sorted(starts):
        stop = start + seq_len
        covered += stop - max(start, end) if stop > end else 0
        end = max(end, stop)
    return covered


def build_calibration(tokenizer, spec: CalibrationSpec, stats: dict | None = None) -> torch.Tensor:
    """Token ids ``[num_samples, seq_len]`` (int64): documents shuffled with the seed, tokenized and
    joined into one stream (as :func:`brecq.evaluation.perplexity.token_stream` does), and
    ``num_samples`` windows taken at seeded random offsets. ``stats`` (a dict) receives the stream's
    length and the distinct tokens the windows cover; a heavy overlap is warned about."""
    docs = load_documents(spec.path, spec.columns)
    rng = random.Random(spec.seed)
    rng.shuffle(docs)
    stream: list[int] = []
    needed = spec.seq_len * spec.num_samples * 2
    for doc in docs:
        text = _chat_text(tokenizer, doc, spec.columns) if spec.chat_template else doc
        stream.extend(document_ids(tokenizer, text, add_special_tokens=not spec.chat_template))
        if len(stream) >= needed:
            break
    if len(stream) <= spec.seq_len:
        raise ValueError(f"{spec.path}: only {len(stream)} tokens, fewer than seq_len={spec.seq_len}")
    ids = torch.tensor(stream, dtype=torch.long)
    starts = [rng.randrange(0, len(stream) - spec.seq_len + 1) for _ in range(spec.num_samples)]
    out = torch.stack([ids[s:s + spec.seq_len] for s in starts])
    covered = distinct_tokens(starts, spec.seq_len)
    requested = spec.num_samples * spec.seq_len
    log.info("calibration: %d x %d tokens from %s (%d documents, %d tokens read, %d distinct in the windows)",
             spec.num_samples, spec.seq_len, spec.path, len(docs), len(stream), covered)
    if covered < MIN_DISTINCT_SHARE * requested:
        log.warning("calibration: %d windows of %d tokens ask for %d tokens, but %s gives %d and the windows cover "
                    "only %d distinct ones (%.0f %%); use fewer or shorter windows, or more data", spec.num_samples,
                    spec.seq_len, requested, Path(spec.path).name, len(stream), covered, 100 * covered / requested)
    if stats is not None:
        stats.update(stream_tokens=len(stream), requested_tokens=requested, distinct_tokens=covered)
    return out
