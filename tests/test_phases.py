"""The phase registry and the collaborators built on it: one place spells a phase, the gate lets the measuring
job in again, waiting is neither a cost nor a stall, one guard pool stops the job that grew."""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

import pytest

from qexplorer.core.domain.phases import ALONE, PHASES, TIMED, GuardRate, PhaseKind, spec_of
from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.eta import DurationBook, JobEstimate, PhaseEstimate, Source
from qexplorer.core.jobs.clock import PhaseClock, split_waiting, timings_from
from qexplorer.core.jobs.guard import FAST_INTERVAL_S, GuardPool, GuardSample, MemoryGuard
from qexplorer.core.jobs.overlap import TimedGate
from qexplorer.core.jobs.queue import JobQueue
from qexplorer.core.jobs.runner import JobRunner
from qexplorer.core.kinds import JobStatus
from qexplorer.core.simulate import simulated_sampler
from qexplorer.core.units import GIB, MIB

ROOT = Path(__file__).resolve().parents[1]
SPY = [sys.executable, str(Path(__file__).with_name("phase_spy_worker.py"))]


def test_phase_names_are_spelled_in_the_registry_only():
    """No ``Phase("…")`` / ``Progress("…")`` with a literal and no literal of a phase-only name outside
    core/jobs/phases.py: a rule keyed by a string drifts from the registry."""
    only_phases = [k.value for k in PhaseKind if k.value not in {"start", "load", "engine", "reference", "quantize",
                                                                "quality", "export", "server"}]
    literal = re.compile(r'(Phase|Progress)\("|"(' + "|".join(re.escape(n) for n in only_phases) + r')"')
    offenders = []
    for path in (ROOT / "qexplorer").rglob("*.py"):
        if path.name == "phases.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if literal.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_registry_holds_every_rule():
    assert set(PHASES) == set(PhaseKind)
    # the bandwidth test is a measurement too (A3), and so is latency under load (issue 25)
    assert ALONE == {PhaseKind.BENCHMARK, PhaseKind.CALIBRATE, PhaseKind.LOAD_SWEEP}
    assert TIMED >= ALONE and PhaseKind.SERVER in TIMED - ALONE  # bench-server has no worker to pause
    assert not PHASES[PhaseKind.CALIBRATE].in_job_peak
    guard = MemoryGuard()
    for kind, spec in PHASES.items():  # the guard's rate comes from the registry, timed phases at the user's
        expected = 1.0 if spec.guard == GuardRate.USER else FAST_INTERVAL_S
        assert guard.interval_s(kind, 1.0) == expected, kind
    assert spec_of("a-phase-from-a-newer-worker").guard == GuardRate.FAST


def test_the_measuring_job_is_let_in_again_past_an_older_waiting_job():
    """Before: a job's second phase alone (its bandwidth test) waited behind an older job that was itself
    waiting for the measuring job to end - a deadlock."""
    gate = TimedGate(signal_group=lambda pgid, sig: None)
    for pgid in (1, 2):
        gate.spawn(str(pgid), lambda pgid=pgid: pgid, lambda pgid: pgid)
    assert gate.try_enter(2) == ("1",)
    gate.release(2)
    assert gate.try_enter(1) is None  # 2 measures until it ends; 1 (older) waits
    assert gate.try_enter(2) == ("1",)  # 2's calibrate: let in again, and 1 is stopped again
    assert gate.running_alone


def test_waiting_is_split_off_and_is_not_a_stall():
    clock = PhaseClock(timeout_s=1.0, now=0.0)
    clock.enter(PhaseKind.BENCHMARK, 0.0)
    for tick in range(1, 51):  # five seconds waiting for the slot, five times the timeout
        clock.tick(tick / 10, waiting=True, others_running=True)
        assert not clock.stalled(tick / 10)
    clock.enter(PhaseKind.QUALITY, 6.0)
    assert clock.stalled(7.5)  # a phase that makes no progress is still one
    assert clock.close(7.5) == ((PhaseKind.START, 0.0), (PhaseKind.BENCHMARK, 1.0), (PhaseKind.WAITING, 5.0),
                                (PhaseKind.QUALITY, 1.5))
    assert clock.shared == [PhaseKind.QUALITY] or clock.shared == []
    assert split_waiting(PhaseKind.LOAD, 2.0, 0.01) == [(PhaseKind.LOAD, 2.0)]


def test_record_timings_come_from_the_parents_clock():
    vllm = [("start", 1.0), ("quantize", 4.0), ("waiting", 30.0), ("load", 2.0), ("quality", 3.0), ("engine", 40.0),
            ("benchmark", 9.0), ("log-probs", 1.5), ("calibrate", 1.0)]
    timings = timings_from(vllm)
    assert (timings.quantize_s, timings.load_s, timings.quality_s) == (4.0, 40.0, 5.0)  # waiting is in none
    gguf = timings_from([("start", 1.0), ("dequantize", 5.0), ("quantize", 1.0), ("load", 0.5), ("benchmark", 5.0)])
    assert (gguf.quantize_s, gguf.load_s, gguf.quality_s) == (6.0, 0.5, None)


def test_a_job_waiting_longer_than_the_phase_timeout_survives(tmp_path: Path):
    """J1: the second job announces its benchmark and waits while the first measures (benchmark, quality,
    calibrate: 1.6 s), three times its 0.5 s phase timeout; before, the timeout killed it while it waited."""
    runner = JobRunner(sampler=simulated_sampler("none"), interval_s=0.05, worker_command=SPY)
    queue = JobQueue(runner, None, overlap=True)
    first = JobSpec(model_ref="spy", precision="first", data_dir=str(tmp_path), planned_peak_bytes=100 * MIB,
                    phase_timeout_s=0.5, engine_args=("quantize:0.2", "benchmark:0.6", "quality:0.8",
                                                      "calibrate:0.2"))
    second = JobSpec(model_ref="spy", precision="second", data_dir=str(tmp_path), planned_peak_bytes=100 * MIB,
                     phase_timeout_s=0.5, engine_args=("quantize:0.3", "benchmark:0.2"))
    queue.submit([first, second])
    queue.drain()
    views = {v.label: v for v in queue.views()}
    assert {k: v.status for k, v in views.items()} == {"first": JobStatus.OK, "second": JobStatus.OK}, \
        [v.error for v in views.values()]
    assert views["second"].took_s > 1.0  # it did wait, longer than its timeout


def test_two_phases_alone_in_a_row_each_get_a_go(tmp_path: Path):
    """J8: a worker that announces two phases that run alone one after the other is answered twice."""
    runner = JobRunner(sampler=simulated_sampler("none"), interval_s=0.05, worker_command=SPY)
    outcome = runner.run(JobSpec(model_ref="spy", precision="solo", data_dir=str(tmp_path), phase_timeout_s=5,
                                 engine_args=("benchmark:0.2", "calibrate:0.2")))
    assert outcome.ok, outcome.error
    # (a wait for the go longer than the loop's granularity is its own row: not asserted, it depends on the load)
    assert [name for name, _ in outcome.phase_seconds if name != PhaseKind.WAITING] == ["start", "benchmark",
                                                                                       "calibrate"]


def test_one_guard_pool_stops_the_job_whose_footprint_grew():
    """J3: two jobs share one headroom; the plunge is the second job's load, so the first one keeps running
    even when its own sample is the one that trips the trend."""
    pool = GuardPool()
    stops: dict[int, list] = {1: [], 2: []}
    for step in range(12):
        now = step * 0.25
        headroom = int(20 * GIB - step * 2 * GIB)
        for job, footprint in ((1, 2 * GIB), (2, int(1 * GIB + step * 2 * GIB))):
            stop = pool.check(job, now, GuardSample(now, headroom), footprint)
            if stop is not None:
                stops[job].append(stop)
        if stops[2]:
            break
    assert stops[1] == [] and stops[2] and stops[2][0].rule == "trend"


def test_durations_recorded_at_once_lose_nothing(tmp_path: Path):
    """J7: the app's job threads record at once; before, a shared temp name and no lock lost updates."""
    estimate = JobEstimate("q8_0", (PhaseEstimate(PhaseKind.LOAD, "load:llama.cpp", 1.0, 1.0, Source.DEFAULTS,
                                                  base_s=1.0),))

    def record() -> None:
        for _ in range(10):
            DurationBook.in_dir(tmp_path).record(estimate, [(PhaseKind.LOAD, 2.0)])

    threads = [threading.Thread(target=record) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(DurationBook.in_dir(tmp_path).jobs()) == 40
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(("cpus", "quota", "expected"), [({0}, None, 1), ({0, 1}, "50000 100000", 1),
                                                         ({0, 1}, "max 100000", None)])
def test_default_threads_follow_affinity_and_quota(monkeypatch, tmp_path: Path, cpus, quota, expected):
    """A8: threads from the physical cores this process may use and its CPU quota, never the host's count."""
    from qexplorer.core.domain import bench

    cpu_max = tmp_path / "cpu.max"
    if quota:
        cpu_max.write_text(quota)
    real_quota = bench._cpu_quota
    monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: cpus)
    monkeypatch.setattr(bench, "_cpu_quota", lambda: real_quota(str(cpu_max)))
    if expected is None:  # no quota: every allowed CPU's core (SMT siblings count once)
        assert 1 <= bench.default_threads() <= len(cpus)
    else:
        assert bench.default_threads() == expected
    assert bench.BenchConfig().thread_count == bench.default_threads()


def test_two_processes_never_measure_at_once(tmp_path: Path):
    """J9: the gate was per process, so the app and a CLI run timed over each other; one file lock now."""
    lock = tmp_path / "measuring.lock"
    app, cli = (TimedGate(signal_group=lambda pgid, sig: None, machine_lock=lock) for _ in range(2))
    app.spawn("a", lambda: 1, lambda pgid: pgid)
    cli.spawn("b", lambda: 2, lambda pgid: pgid)
    assert app.try_enter(1) == ()
    assert cli.try_enter(2) is None  # the app's job is measuring
    app.release(1)
    assert cli.try_enter(2) is None  # still measuring (its quality pass): the lock is held to its end
    app.leave(1)
    assert cli.try_enter(2) == ()
    cli.leave(2)
