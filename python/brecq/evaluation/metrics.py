"""Metrics and statistics: SQuAD normalisation, exact match and F1, answer-letter extraction,
Wilson and bootstrap intervals, McNemar's test."""
from __future__ import annotations

import collections
import math
import random
import re
import string

# --- SQuAD (the official v2 evaluation script's normalisation) --------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        # No-answer: F1 is 1 if both are empty, else 0 (as the official script).
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, golds) -> tuple[float, float]:
    """(EM, F1) as the maximum over the gold answers; no gold answers means unanswerable, and the
    only correct prediction is the empty answer."""
    golds = list(golds) or [""]
    return max(exact_match(prediction, g) for g in golds), max(f1_score(prediction, g) for g in golds)


# --- multiple-choice letters -------------------------------------------------------------------
def extract_choice(text: str, labels) -> str | None:
    """The option label a generated answer chooses, or None when it cannot be told.

    Tried in order: an explicit statement ("answer is B", "Answer: (B)"), a label at the very start
    ("B", "B.", "(B)", "B) text"), then a lone label that is the only one mentioned as a word.
    """
    labels = [str(label) for label in labels]
    alternatives = "|".join(re.escape(label) for label in labels)
    text = text.strip()
    # The keyword in any case, the label as written ("the answer is a rock" is not option A).
    explicit = re.search(rf"(?i:answer)\s*(?:(?i:is)|:)?\s*[:\-]?\s*\(?\**({alternatives})\**\)?(?![\w])", text)
    if explicit:
        return explicit.group(1)
    mentioned = {m.group(1) for m in re.finditer(rf"(?<![\w])({alternatives})(?![\w])", text)}
    start = re.match(rf"^\W{{0,3}}({alternatives})([.):\]]|\s|$)", text)
    # A leading label counts when punctuated ("B." / "B)") or when it is the only label mentioned.
    if start and (start.group(2) in ".):]" and start.group(2) or mentioned == {start.group(1)}):
        return start.group(1)
    if len(mentioned) == 1:
        return mentioned.pop()
    return None


# --- statistics --------------------------------------------------------------------------------
def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(values, resamples: int = 2000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap interval of the mean of ``values``."""
    values = list(values)
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return (lo, hi)


def paired_bootstrap_difference(a, b, resamples: int = 2000, seed: int = 0):
    """Mean of b - a over paired examples, with its percentile bootstrap 95 % interval."""
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap_difference: runs differ in length ({len(a)} vs {len(b)})")
    diffs = [y - x for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs) if diffs else float("nan")
    return mean, bootstrap_interval(diffs, resamples, seed)


def mcnemar_p_value(a, b) -> float:
    """Exact (binomial) two-sided McNemar test on paired binary outcomes a, b."""
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)
