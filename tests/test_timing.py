"""Latency comparisons: the ratio's interval, the verdict, and the detection of a busy machine."""
import subprocess
import sys
import time

import numpy as np
import pytest

from brecq.measurement.timing import Activity, disturbance, ratio_interval, speed_verdict


def test_ratio_interval_brackets_a_known_ratio_and_cancels_drift():
    rng = np.random.default_rng(0)
    drift = np.linspace(10, 20, 200)  # the machine slows down during the run: both feel it
    reference = drift * (1 + 0.02 * rng.standard_normal(200))
    other = 0.8 * drift * (1 + 0.02 * rng.standard_normal(200))
    ratio, (lo, hi) = ratio_interval(reference, other)
    assert lo < 0.8 < hi and hi - lo < 0.05 and ratio == pytest.approx(0.8, abs=0.02)
    with pytest.raises(ValueError, match="equally long"):
        ratio_interval([1.0, 2.0], [1.0])


@pytest.mark.parametrize("ci,load,verdict", [
    ((0.7, 0.9), {}, "faster"), ((1.1, 1.3), {}, "slower"), ((0.9, 1.1), {}, "no clear difference"),
    ((0.7, 0.9), {"busy": True, "reason": "other processes used 60 % of the CPUs"}, "withheld")])
def test_speed_verdict(ci, load, verdict):
    assert speed_verdict(ci, load) == verdict


def test_another_process_burning_cpu_is_detected():
    quiet = disturbance(Activity.now(), (time.sleep(0.3), Activity.now())[1])
    burner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"])
    try:
        before = Activity.now()
        time.sleep(1.0)
        after = Activity.now()  # before the child is waited for: its CPU time is not ours yet
    finally:
        burner.wait()
    busy = disturbance(before, after)
    if busy.other_cpu_share is None:
        pytest.skip("no /proc/stat here")
    assert busy.busy and "other processes used" in busy.reason
    if quiet.other_cpu_share > 0.6:  # one more process cannot add 20 points to a saturated machine
        pytest.skip(f"other processes already used {quiet.other_cpu_share:.0%} of the CPUs before the burner started")
    assert busy.other_cpu_share > quiet.other_cpu_share + 0.2


def test_repeats_that_spread_widely_mark_the_run_noisy():
    now = Activity.now()
    noisy = disturbance(now, now, repeat_medians=[10.0, 10.5, 14.0])
    assert noisy.repeat_spread == pytest.approx(4.0 / 10.5) and noisy.busy and "spread" in noisy.reason
