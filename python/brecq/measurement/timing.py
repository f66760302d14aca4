"""Honest latency comparisons: the 95 % interval of a decode-time ratio from interleaved samples,
when to stop sampling, and whether the machine was disturbed while the samples were taken.

A verdict ("faster", "slower", "no clear difference") is given only from an undisturbed run; when
other processes took a noticeable share of the CPUs (or a hypervisor stole it), the numbers are
still reported, but the verdict is withheld.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Other processes' share of all CPUs, and the hypervisor's steal share, above which a run counts as
# disturbed; and the spread of per-repeat medians above which it counts as noisy.
BUSY_OTHER_SHARE = 0.20
BUSY_STEAL_SHARE = 0.05
NOISY_REPEAT_SPREAD = 0.15


@dataclass(frozen=True)
class Activity:
    """A snapshot of the machine's CPU accounting and this process's CPU time."""

    wall: float
    cpu_ticks: tuple  # /proc/stat "cpu" line: user nice system idle iowait irq softirq steal ...
    own_cpu_s: float  # this process and its waited-for children
    loadavg: tuple

    @classmethod
    def now(cls) -> "Activity":
        ticks: tuple = ()
        try:
            line = Path("/proc/stat").read_text().splitlines()[0]
            ticks = tuple(int(x) for x in line.split()[1:])
        except (OSError, ValueError, IndexError):
            pass
        times = os.times()
        try:
            load = os.getloadavg()
        except OSError:
            load = ()
        return cls(time.monotonic(), ticks, times.user + times.system + times.children_user + times.children_system,
                   tuple(load))


@dataclass(frozen=True)
class Disturbance:
    """How busy the machine was between two snapshots, besides this process."""

    seconds: float
    other_cpu_share: float | None  # other processes' CPU time / (wall time x CPUs)
    steal_share: float | None  # time the hypervisor gave to others / all CPU time
    loadavg_before: tuple
    loadavg_after: tuple
    repeat_spread: float | None = None  # (max - min) / median of the per-repeat decode medians
    busy: bool = False
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def disturbance(before: Activity, after: Activity, repeat_medians: list[float] | None = None) -> Disturbance:
    seconds = max(after.wall - before.wall, 1e-9)
    other = steal = None
    if before.cpu_ticks and after.cpu_ticks and len(before.cpu_ticks) >= 8:
        delta = [b - a for a, b in zip(before.cpu_ticks, after.cpu_ticks)]
        tick = os.sysconf("SC_CLK_TCK")
        total = sum(delta[:8])
        busy = total - delta[3] - delta[4]  # all but idle and iowait
        if total > 0:
            steal = delta[7] / total
            own = after.own_cpu_s - before.own_cpu_s
            cpus = os.cpu_count() or 1
            other = max(0.0, (busy - delta[7]) / tick - own) / (seconds * cpus)
    spread = None
    if repeat_medians and len(repeat_medians) > 1:
        spread = (max(repeat_medians) - min(repeat_medians)) / float(np.median(repeat_medians))
    reasons = []
    if other is not None and other > BUSY_OTHER_SHARE:
        reasons.append(f"other processes used {100 * other:.0f} % of the CPUs")
    if steal is not None and steal > BUSY_STEAL_SHARE:
        reasons.append(f"the hypervisor stole {100 * steal:.0f} % of CPU time")
    if spread is not None and spread > NOISY_REPEAT_SPREAD:
        reasons.append(f"repeats spread by {100 * spread:.0f} %")
    return Disturbance(seconds, other, steal, before.loadavg, after.loadavg, spread, bool(reasons), "; ".join(reasons))


def ratio_interval(reference_ms, other_ms, resamples: int = 2000, seed: int = 0, level: float = 0.95):
    """Ratio of median step times ``other / reference`` with a paired bootstrap interval: sample ``i``
    of both was taken side by side (same repeat, same decode step, interleaved), so pairs are
    resampled together and the machine's drift cancels."""
    ref = np.asarray(reference_ms, dtype=np.float64)
    oth = np.asarray(other_ms, dtype=np.float64)
    if ref.shape != oth.shape or ref.size < 2:
        raise ValueError(f"ratio_interval: need two equally long paired samples, got {ref.size} and {oth.size}")
    ratio = float(np.median(oth) / np.median(ref))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, ref.size, size=(resamples, ref.size))
    boot = np.sort(np.median(oth[idx], axis=1) / np.median(ref[idx], axis=1))
    lo = boot[int((1 - level) / 2 * resamples)]
    hi = boot[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return ratio, (float(lo), float(hi))


def speed_verdict(ci: tuple[float, float], load: dict | None) -> str:
    """'faster' / 'slower' when the interval of the time ratio excludes 1, 'no clear difference'
    when it spans 1; withheld when the measurement was disturbed."""
    if load and load.get("busy"):
        return "withheld"
    lo, hi = ci
    if hi < 1:
        return "faster"
    if lo > 1:
        return "slower"
    return "no clear difference"
