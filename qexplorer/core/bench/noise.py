"""Was the machine quiet while a speed figure was timed?

A benchmark on a busy host measures the host, not the precision: with a
compiler running beside it, GGUF Q8_0 decoded at 11.6 tok/s and Q4_K_M at
69.4 on this 2-core box, and nothing said so. :class:`NoiseProbe` brackets the
timed phase of a benchmark (never inside it: reading every process's CPU time
is a few milliseconds of work) and reports

* ``other_cpu_pct`` - CPU time of every process outside the measured tree, as a
  share of the machine's cores over the window:
  ``(Δ busy time of all CPUs − Δ CPU time of the measured processes) ÷ (wall × cores)``,
  busy = user + nice + system + irq + softirq + steal (steal: a hypervisor that
  takes the core is noise too);
* the busiest other process by name and PID, with its share of one core;
* the coefficient of variation of the decode repetitions.

A figure is *noisy* when other processes took ≥ ``NOISY_OTHER_CPU_PCT`` of the
machine or the repetitions spread by ≥ ``NOISY_CV_PCT``. Why these numbers: one
CPU-bound process beside a 2-thread llama.cpp decode on 2 cores is 50 % of the
machine, and with a compile beside it Q8_0 decoded at 11.6 tok/s instead of
about 90 (llama.cpp's threads meet at a barrier after every operation and wait
for the slowest); 10 % is a fifth of that and leaves room for a shell and a
monitor. On this box, idle, Q8_0's pp512 / tg128 rounds beside llama-bench all
stayed under both thresholds; 5 % CV is where the spread starts to hide the
5-10 % gaps between neighbouring K-quants. Both are first choices, to be
refitted from more measurements.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

from qexplorer.core.domain.record import NOISY_CV_PCT, NOISY_OTHER_CPU_PCT, Noise

_BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")


def _busy_s() -> float:
    import psutil

    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in _BUSY_FIELDS)


def _process_cpu_s() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of every process we may read, by PID."""
    import psutil

    found: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["pid", "name", "cpu_times"]):
        info = proc.info
        times = info.get("cpu_times")
        if times is not None:
            found[info["pid"]] = (info.get("name") or "?", times.user + times.system)
    return found


def own_tree(pid: int | None = None) -> set[int]:
    """``pid`` (default: this process) and all its descendants."""
    import psutil

    try:
        root = psutil.Process(pid or os.getpid())
        return {root.pid} | {child.pid for child in root.children(recursive=True)}
    except psutil.Error:
        return {pid or os.getpid()}


class NoiseProbe:
    """``start()`` before the first timed repetition, ``stop(cv_pct)`` after the last.

    ``measured`` names the processes whose CPU time *is* the measurement (the worker, the server it
    started, a local server under test); everything else is noise."""

    def __init__(self, measured: Callable[[], Iterable[int]] = own_tree,
                 cores: int | None = None) -> None:
        self._measured = measured
        self._cores = cores or os.cpu_count() or 1
        self._start_wall = 0.0
        self._start_busy = 0.0
        self._start_procs: dict[int, tuple[str, float]] = {}

    def start(self) -> NoiseProbe:
        self._start_procs = _process_cpu_s()
        self._start_busy = _busy_s()
        self._start_wall = time.monotonic()
        return self

    def stop(self, cv_pct: float | None) -> Noise:
        wall = time.monotonic() - self._start_wall
        busy = _busy_s() - self._start_busy
        procs = _process_cpu_s()
        measured = set(self._measured())
        deltas = {pid: (name, cpu - self._start_procs.get(pid, (name, 0.0))[1]) for pid, (name, cpu) in procs.items()}
        measured_s = sum(delta for pid, (_, delta) in deltas.items() if pid in measured)
        others = [(delta, name, pid) for pid, (name, delta) in deltas.items() if pid not in measured and delta > 0]
        return judge(other_cpu_s=max(0.0, busy - measured_s), wall_s=wall, cores=self._cores, cv_pct=cv_pct,
                     busiest=max(others, default=None))


def judge(*, other_cpu_s: float, wall_s: float, cores: int, cv_pct: float | None,
          busiest: tuple[float, str, int] | None) -> Noise:
    """The verdict from the raw figures (separate so that the thresholds are tested without a busy machine)."""
    other_pct = 100.0 * other_cpu_s / (wall_s * cores) if wall_s > 0 else 0.0
    busiest_name = busiest_pct = None
    if busiest is not None and wall_s > 0:
        busiest_name, busiest_pct = f"{busiest[1]} (pid {busiest[2]})", 100.0 * busiest[0] / wall_s
    reasons = []
    if other_pct >= NOISY_OTHER_CPU_PCT:
        who = f", most of it {busiest_name} at {busiest_pct:.0f} % of a core" if busiest_name else ""
        reasons.append(f"other processes used {other_pct:.0f} % of the {cores} cores while it was timed{who}")
    if cv_pct is not None and cv_pct >= NOISY_CV_PCT:
        reasons.append(f"its repetitions spread by {cv_pct:.1f} % (coefficient of variation)")
    return Noise(other_cpu_pct=round(other_pct, 2), cv_pct=None if cv_pct is None else round(cv_pct, 2),
                 busiest=busiest_name, busiest_cpu_pct=None if busiest_pct is None else round(busiest_pct, 1),
                 noisy=bool(reasons), reason=("Noisy: " + "; ".join(reasons) + ".") if reasons else None)
