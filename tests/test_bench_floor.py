"""bench/cpu_runtime.py's floor ratios apart by the host's read rate (a bench script, not installed)."""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from cpu_runtime import by_read_rate  # noqa: E402


def test_two_read_rates_are_summarised_apart():
    rng = random.Random(0)
    slow = [(35 + 3 * rng.random(), 1.10 + 0.05 * rng.random()) for _ in range(60)]
    fast = [(60 + 4 * rng.random(), 1.25 + 0.05 * rng.random()) for _ in range(30)]
    steps = slow + fast
    rng.shuffle(steps)
    split = by_read_rate(steps)
    assert 38 < split["split_gbs"] < 60
    assert split["slow"]["n"] == 60 and split["fast"]["n"] == 30
    assert 1.10 <= split["slow"]["median"] <= 1.15 and 1.25 <= split["fast"]["median"] <= 1.30


def test_one_read_rate_is_not_split():
    rng = random.Random(1)
    assert by_read_rate([(35 + 3 * rng.random(), 1.1) for _ in range(50)]) == {}
    assert by_read_rate([]) == {}
