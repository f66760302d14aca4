"""Metrics and statistics: SQuAD normalisation, exact match and F1, answer-letter extraction,
Wilson, Tango (paired proportions) and bootstrap intervals, McNemar's test."""
from __future__ import annotations

import collections
import math
import re
import string

import numpy as np

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
    """Percentile bootstrap interval of the mean of ``values`` (vectorised: a SQuAD-dev-sized set
    of 11,873 values takes well under a second)."""
    values = np.asarray(list(values), dtype=np.float64)
    n = values.size
    if n == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, (1 << 22) // n)  # about 4 M indices at a time
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    means.sort()
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return (float(lo), float(hi))


def paired_bootstrap_difference(a, b, resamples: int = 2000, seed: int = 0):
    """Mean of b - a over paired examples, with its percentile bootstrap 95 % interval (for
    continuous per-example scores such as F1; binary ones take :func:`paired_proportion_difference`)."""
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap_difference: runs differ in length ({len(a)} vs {len(b)})")
    diffs = [y - x for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs) if diffs else float("nan")
    return mean, bootstrap_interval(diffs, resamples, seed)


Z95 = 1.959963984540054


def tango_paired_interval(only_a, only_b, n, z: float = Z95, iterations: int = 60):
    """95 % score interval of ``p_b - p_a`` for paired binary outcomes (Tango 1998): the
    differences ``d`` whose score statistic, with the nuisance parameter at its maximum-likelihood
    value under ``d``, stays within ``z``. Depends on the discordant counts (``only_a``: a right, b
    wrong) and ``n`` only, and keeps a width that reflects ``n`` when few or no pairs disagree,
    where a bootstrap collapses to a point. numpy arrays work elementwise (bisection)."""
    b_wins, a_wins, n = (np.asarray(x, dtype=np.float64) for x in (only_b, only_a, n))
    concordant = n - b_wins - a_wins

    def score(d):
        # The likelihood under p(b only) - p(a only) = d is largest at p(a only) = x, the positive
        # root of 2n x^2 - B x - C = 0.
        big_b = b_wins * (1 - d) + a_wins * (1 - 3 * d) - 2 * concordant * d
        big_c = a_wins * d * (1 - d)
        x = (big_b + np.sqrt(np.maximum(big_b * big_b + 8 * n * big_c, 0.0))) / (4 * n)
        with np.errstate(divide="ignore", invalid="ignore"):
            return (b_wins - a_wins - n * d) / np.sqrt(n * (2 * x + d * (1 - d)))

    estimate = (b_wins - a_wins) / n
    # The score falls as d rises: bisect for score = +z below the estimate and -z above it.
    low_out, low_in = np.full_like(estimate, -1.0), estimate.copy()
    high_in, high_out = estimate.copy(), np.full_like(estimate, 1.0)
    for _ in range(iterations):
        mid = (low_out + low_in) / 2
        inside = score(mid) <= z
        low_in, low_out = np.where(inside, mid, low_in), np.where(inside, low_out, mid)
        mid = (high_in + high_out) / 2
        inside = score(mid) >= -z
        high_in, high_out = np.where(inside, mid, high_in), np.where(inside, high_out, mid)
    return low_in, high_in


def paired_proportion_difference(a, b, z: float = Z95):
    """Mean of b - a over paired binary outcomes, with Tango's 95 % score interval."""
    if len(a) != len(b):
        raise ValueError(f"paired_proportion_difference: runs differ in length ({len(a)} vs {len(b)})")
    if not len(a):
        return float("nan"), (float("nan"), float("nan"))
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    lo, hi = tango_paired_interval(int((a & ~b).sum()), int((~a & b).sum()), len(a), z=z)
    return float(b.mean() - a.mean()), (float(lo), float(hi))


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
