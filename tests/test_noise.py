"""The noise flag: thresholds on raw figures, and a real CPU-bound child named as the busy process."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from qexplorer.core.bench.noise import NOISY_CV_PCT, NOISY_OTHER_CPU_PCT, NoiseProbe, judge


def test_quiet_figures_are_not_noisy():
    noise = judge(other_cpu_s=0.02, wall_s=1.0, cores=2, cv_pct=1.0, busiest=(0.02, "bash", 7))
    assert not noise.noisy and noise.reason is None
    assert noise.other_cpu_pct == 1.0


def test_other_load_and_spread_each_make_a_figure_noisy():
    loaded = judge(other_cpu_s=2 * NOISY_OTHER_CPU_PCT / 100 * 2.0, wall_s=2.0, cores=2, cv_pct=None,
                   busiest=(0.8, "cc1plus", 4242))
    assert loaded.noisy and "cc1plus (pid 4242)" in loaded.reason and loaded.busiest_cpu_pct == 40.0
    spread = judge(other_cpu_s=0.0, wall_s=1.0, cores=2, cv_pct=NOISY_CV_PCT + 0.1, busiest=None)
    assert spread.noisy and "spread" in spread.reason


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.timing
def test_a_busy_child_outside_the_measured_tree_is_named():
    child = multiprocessing.get_context("spawn").Process(target=_spin, args=(3.0,), name="spinner")
    child.start()
    try:
        time.sleep(0.5)  # the child is up and spinning
        probe = NoiseProbe(measured=lambda: set()).start()  # nothing is "ours": the child is noise
        time.sleep(1.5)
        noise = probe.stop(cv_pct=0.5)
    finally:
        child.join()
    assert noise.noisy, noise
    assert noise.busiest is not None and f"pid {child.pid}" in noise.busiest
    assert noise.busiest_cpu_pct > 25  # a spinning process, on a box where the suite competes for the cores
