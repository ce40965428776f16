"""Overlap only what is not timed (jobs.overlap): the next job prepares beside the running one, and nothing of
another job runs while a timed phase does - checked by spying on the phases of two real worker processes."""

from __future__ import annotations

import signal
import sys
from collections import defaultdict
from pathlib import Path

from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.jobs.overlap import TimedGate, fits_together
from qexplorer.core.jobs.queue import JobQueue
from qexplorer.core.jobs.runner import JobRunner
from qexplorer.core.kinds import JobStatus
from qexplorer.core.simulate import simulated_sampler
from qexplorer.core.units import MIB

SPY = [sys.executable, str(Path(__file__).with_name("phase_spy_worker.py"))]


def heartbeats(path: Path) -> dict[tuple[str, str], list[float]]:
    beats: dict[tuple[str, str], list[float]] = defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        job, phase, stamp = line.split()
        beats[(job, phase)].append(float(stamp))
    return beats


def run_two(tmp_path: Path, overlap: bool) -> tuple[JobQueue, dict[tuple[str, str], list[float]]]:
    runner = JobRunner(sampler=simulated_sampler("none"), interval_s=0.05, worker_command=SPY)
    queue = JobQueue(runner, None, overlap=overlap)
    specs = [JobSpec(model_ref="spy", precision=name, data_dir=str(tmp_path), planned_peak_bytes=100 * MIB)
             for name in ("first", "second")]
    queue.submit(specs)
    queue.drain()
    return queue, heartbeats(tmp_path / "spy.log")


def test_no_preparation_overlaps_a_timed_phase(tmp_path: Path):
    queue, beats = run_two(tmp_path, overlap=True)
    views = {v.label: v for v in queue.views()}
    assert all(v.status == JobStatus.OK for v in views.values()), [v.error for v in views.values()]
    for job, other in (("first", "second"), ("second", "first")):
        for alone in ("benchmark", "calibrate"):  # the speed and the roofline's bandwidth both run alone
            timed = beats[(job, alone)]
            start, end = min(timed), max(timed)
            intruders = [t for (name, _), stamps in beats.items() if name == other for t in stamps if start < t < end]
            assert intruders == [], f"{other} ran {len(intruders)} times inside {job}'s {alone} phase"
        record = views[job].record
        assert record is not None and {"benchmark", "calibrate"}.isdisjoint(record.shared_phases)
    # and the overlap is real: the second job prepared while the first one was still in an untimed phase
    first_untimed = beats[("first", "quantize")] + beats[("first", "quality")]
    second_prep = beats[("second", "quantize")]
    assert any(min(first_untimed) < t < max(first_untimed) for t in second_prep)
    # measurements never share the CPU: one job's measuring stretch (its benchmark to its end) is over before the
    # other's begins; the one that measured first paused the other, which was still alive, and says so
    def stretch(job: str) -> tuple[float, float]:
        return min(beats[(job, "benchmark")]), max(beats[(job, "calibrate")])

    early, late = sorted(("first", "second"), key=lambda job: stretch(job)[0])
    assert stretch(early)[1] < stretch(late)[0]
    assert views[early].record.paused_for_timing == (late,) and views[late].record.paused_for_timing == ()
    assert "quantize" in views["second"].record.shared_phases


def test_without_overlap_the_jobs_run_one_after_the_other(tmp_path: Path):
    queue, beats = run_two(tmp_path, overlap=False)
    assert max(t for (job, _), s in beats.items() if job == "first" for t in s) < \
        min(t for (job, _), s in beats.items() if job == "second" for t in s)
    assert all(v.record is not None and v.record.shared_phases == () for v in queue.views())


def test_the_gate_pauses_others_and_continues_them():
    sent: list[tuple[int, int]] = []
    gate = TimedGate(signal_group=lambda pgid, sig: sent.append((pgid, sig)))
    assert gate.spawn("a", lambda: 1, lambda pgid: pgid) == 1
    assert gate.spawn("b", lambda: 2, lambda pgid: pgid) == 2
    assert gate.try_enter(1) == ("b",) and sent == [(2, signal.SIGSTOP)]
    assert gate.try_enter(2) is None  # one timed phase at a time
    assert gate.spawn("c", lambda: 3, lambda pgid: pgid) is None  # nothing starts beside a timed phase
    assert gate.is_paused(2) and not gate.others_running(1)
    gate.release(1)
    assert sent[-1] == (2, signal.SIGCONT) and gate.others_running(1)
    assert gate.try_enter(2) is None  # 1 is still measuring (its quality pass): 2 waits
    gate.leave(1)
    assert gate.try_enter(2) == () and gate.running_alone
    assert gate.spawn("d", lambda: 4, lambda pgid: pgid) is None
    gate.release(2)
    assert gate.spawn("d", lambda: 4, lambda pgid: pgid) == 4
    gate.try_enter(2)
    gate.leave(4)  # a paused worker that is being stopped is continued first, so it can act on SIGTERM
    assert sent[-1] == (4, signal.SIGCONT)


def test_the_oldest_ready_job_measures_first():
    gate = TimedGate(signal_group=lambda pgid, sig: None)
    for pgid in (1, 2, 3):
        gate.spawn(str(pgid), lambda pgid=pgid: pgid, lambda pgid: pgid)
    assert gate.try_enter(3) == ("1", "2")  # 1 and 2 still prepare: the ready one measures, the others wait
    assert gate.try_enter(2) is None  # 3 is measuring
    gate.release(3)
    assert gate.try_enter(1) is None  # 3's quality pass: still measuring
    gate.leave(3)
    assert gate.try_enter(2) is None  # 1 (older) is waiting too: it goes first
    assert gate.try_enter(1) == ("2",)


def test_jobs_overlap_only_when_both_planned_peaks_fit():
    assert fits_together([4 * MIB, 4 * MIB], 10 * MIB)
    assert not fits_together([6 * MIB, 4 * MIB], 10 * MIB)  # 80 % of the headroom at most
    assert not fits_together([4 * MIB, None], 100 * MIB)  # an unplanned job runs alone
    assert not fits_together([4 * MIB, 4 * MIB], None)


def test_overlap_on_a_discrete_card_is_admitted_against_its_vram_not_the_hosts_ram():
    """Review J4 / issue 23 item 6: before, a second GPU job was admitted against host headroom (an H100 host has
    hundreds of GiB), so two jobs that each fit in VRAM but not together started, and the second's vLLM failed
    its start-up check. Now the card decides, with room left for vLLM's check."""
    from qexplorer.core.jobs.overlap import fits_on_card, fits_together

    gib = 1024**3
    assert fits_together([30 * gib, 40 * gib], 200 * gib)  # the host alone would admit it
    # an 80 GiB card: job A plans 30 GiB and holds 10 now, 69 GiB free
    assert not fits_on_card([30 * gib], [10 * gib], 40 * gib, 69 * gib)
    assert fits_on_card([30 * gib], [10 * gib], 20 * gib, 69 * gib)
    # vLLM's start-up check: after A grows to its plan only 20 GiB would be free, less than B's plan + margin
    assert not fits_on_card([50 * gib], [1 * gib], 19.5 * gib, 70 * gib)
    assert fits_on_card([None], [None], None, None)  # CPU jobs: the card does not matter
    # one job above its plan does not hide another that will still grow (pairwise, not netted)
    assert not fits_on_card([10 * gib, 40 * gib], [40 * gib, 0], 25 * gib, 60 * gib)  # netted it passed
    assert fits_on_card([10 * gib, 40 * gib], [40 * gib, 0], 15 * gib, 60 * gib)
    assert not fits_on_card([30 * gib], [10 * gib], 5 * gib, None)  # a GPU plan and no reading: one at a time
