"""One job = one child process, watched from outside.

:class:`JobRunner` starts ``python -m qexplorer.worker`` with the job on stdin
(an argument list, never a shell string) and supervises it with three small
collaborators that one loop composes:

* :class:`~.channel.WorkerChannel` - the worker's event lines (read on a
  thread), the go lines on its stdin, its stop (the whole process group);
* :class:`~.watch.MemoryWatch` - the job's memory from outside, its peaks, and
  the runner's one :class:`~.guard.GuardPool`, which stops the job whose
  footprint grew before the machine runs out (on unified memory, before the box
  freezes);
* :class:`~.clock.PhaseClock` - each phase's cost with the time spent waiting
  split off, the phases that ran beside another job, and the stall timeout;

plus the :class:`~.overlap.TimedGate` handshake for phases that run alone. A
crash, an OOM kill or a cancel ends the child only; memory goes back to the
system when it exits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from qexplorer.core.domain.events import (
    Completed,
    Failed,
    JobEvent,
    Log,
    Phase,
    ReuseQuery,
    event_from_line,
    reuse_answer_line,
)
from qexplorer.core.domain.record import ExportRecord, ModelIdentity, RunRecord
from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.jobs.channel import WorkerChannel
from qexplorer.core.jobs.clock import PhaseClock, timings_from
from qexplorer.core.jobs.guard import GuardPool, MemoryGuard
from qexplorer.core.jobs.overlap import (
    PREPARE_NICE,
    TimedGate,
    can_restore_priority,
    machine_lock_path,
    set_tree_nice,
)
from qexplorer.core.jobs.watch import MemorySample, MemoryWatch
from qexplorer.core.kinds import Family, JobStatus
from qexplorer.core.serving.vllm_launch import ContainerVllm
from qexplorer.core.telemetry import TelemetrySampler
from qexplorer.core.units import format_gib

# The guard kills at once (no grace: memory is running out). On GB10 a process killed mid-load can leave its
# memory held until a reboot (reviews/gpu-audit.md P3, "Kill while loading on GB10"; after an OOM kill mid-load on a
# Spark about 30 GiB of shmem stayed resident for a while: github.com/MiaAI-Lab/GLM-5.3-Flash-EXL3-2x-DGX-Sparks/
# issues/193).
UNIFIED_KILL_NOTE = ("It was killed at once, and on unified memory (GB10) a process killed mid-load can leave its "
                     "memory held: if MemAvailable does not recover within a minute, a reboot may be needed.")


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended. ``record`` is set for a finished run, ``export`` for a finished export."""

    job: JobSpec
    status: JobStatus
    error: str | None
    record: RunRecord | None = None
    export: ExportRecord | None = None
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int | None = None
    gpu_source: str = ""
    exit_code: int | None = None
    log_path: Path | None = None
    memory: tuple[MemorySample, ...] = ()
    phase_seconds: tuple[tuple[str, float], ...] = ()  # each phase's wall time, in order, seen from the parent

    @property
    def ok(self) -> bool:
        return self.status == JobStatus.OK


def describe_exit(code: int | None) -> str:
    if code is None:
        return "the worker did not exit"
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = " - the kernel's OOM killer does this when memory runs out" if -code == signal.SIGKILL else ""
        return f"the worker was killed by {name}{hint}"
    return f"the worker exited with code {code} without a result"


class JobRunner:
    """Runs jobs in worker processes. ``sampler`` is the telemetry the guard reads: the real machine's (tests
    pass a simulated one to drive the guard); ``display`` is the sampler the screens draw from, told which
    PIDs are qexplorer's jobs. Jobs run by one runner share its gate and its guard pool."""

    def __init__(self, sampler: TelemetrySampler | None = None, interval_s: float = 1.0,
                 python: str = sys.executable, log_dir: Path | None = None,
                 extra_env: dict[str, str] | None = None, worker_command: list[str] | None = None,
                 display: TelemetrySampler | None = None, guard: type[MemoryGuard] = MemoryGuard) -> None:
        self.sampler = sampler
        self.display = display
        # The seam for fault tests: a different child (one that hangs, say) in place of the worker.
        self.worker_command = worker_command or [python, "-m", "qexplorer.worker"]
        self.interval_s = interval_s
        self.python = python
        self.log_dir = log_dir
        self.extra_env = extra_env or {}
        self.current_pid: int | None = None
        self._own_lock = threading.Lock()
        self._can_nice: bool | None = None  # may a preparing job be niced and raised back (overlap.PREPARE_NICE)
        self.gate = TimedGate(machine_lock=machine_lock_path())
        self.guard_pool = GuardPool(guard())

    def _spawn(self, job: JobSpec, log_path: Path) -> subprocess.Popen[str]:
        from qexplorer.core.jobs.channel import send_line
        from qexplorer.core.safety import OFFLINE_ENV

        # workers never download: an --allow-download parent has already fetched what it needs
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **OFFLINE_ENV, **self.extra_env}
        log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed when the job ends
        os.chmod(log_path, 0o600)
        try:
            proc = subprocess.Popen(
                self.worker_command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, text=True, env=env, start_new_session=True,
            )
        finally:
            log.close()
        # one line; stdin stays open for the go before each phase that runs alone, closed when the job ends
        send_line(proc, json.dumps(job.to_json()))
        return proc

    def _start(self, job: JobSpec, log_path: Path, cancel: threading.Event | None) -> subprocess.Popen[str] | None:
        """The worker, once no phase runs alone; None if cancelled first."""
        while True:
            proc = self.gate.spawn(job.precision, lambda: self._spawn(job, log_path), lambda p: p.pid)
            if proc is not None:
                return proc
            if cancel is not None and cancel.is_set():
                return None
            time.sleep(0.05)

    def run(self, job: JobSpec, on_event: Callable[[JobEvent], None] | None = None,
            cancel: threading.Event | None = None,
            on_memory: Callable[[MemorySample], None] | None = None) -> JobOutcome:
        log_dir = self.log_dir or Path(job.data_dir) / "logs"
        log_path = log_dir / f"job-{int(time.time() * 1000)}-{job.precision}.log"
        proc = self._start(job, log_path, cancel)
        if proc is None:
            return JobOutcome(job=job, status=JobStatus.CANCELLED, error="Cancelled by the user.")
        self.current_pid = proc.pid  # the newest worker (tests and the CLI's interrupt use it)
        niced = bool(job.prepare_threads) and self._may_nice() and set_tree_nice(proc.pid, PREPARE_NICE)
        self._own(proc.pid, True)
        container = self.container_vllm()
        job_run = _Supervision(self, job, proc, niced, on_event, cancel, on_memory, by_growth=container is not None)
        try:
            job_run.loop()
        finally:
            self.gate.leave(proc.pid)  # continues it first if it was paused: it must see the SIGTERM
            self.guard_pool.leave(proc.pid)
            job_run.channel.close()
            if container is not None:  # a killed worker cannot stop its server's container: removed by name
                remove_container(container, proc.pid)
            if self.current_pid == proc.pid:
                self.current_pid = None
            self._own(proc.pid, False)
        return job_run.outcome(log_path)

    def container_vllm(self) -> ContainerVllm | None:
        """vLLM in a container (QEXPLORER_VLLM=docker:IMAGE): its processes are not the worker's children, so
        the job's GPU memory is the device's growth, and the parent removes the container when the job ends."""
        return ContainerVllm.parse(self.extra_env.get("QEXPLORER_VLLM") or os.environ.get("QEXPLORER_VLLM"))

    def _own(self, pid: int, add: bool) -> None:
        """Tell the samplers which PIDs are qexplorer's jobs (two jobs' threads may start and end at once)."""
        with self._own_lock:
            for watcher in {id(s): s for s in (self.sampler, self.display) if s is not None}.values():
                watcher.own_pids = watcher.own_pids | {pid} if add else watcher.own_pids - {pid}

    def _may_nice(self) -> bool:
        if self._can_nice is None:
            self._can_nice = can_restore_priority()
        return self._can_nice


class _Turn:
    """One job's side of the gate: it asks to run a phase alone, raises its priority back before it measures,
    writes the go, and says when it was paused for another job."""

    def __init__(self, gate: TimedGate, channel: WorkerChannel, niced: bool,
                 on_event: Callable[[JobEvent], None] | None) -> None:
        self.gate, self.channel, self.niced, self.on_event = gate, channel, niced, on_event
        self.waiting = self.announced = self.was_paused = self.alone = False
        self.paused_for: set[str] = set()

    def tick(self, may_enter: bool) -> bool:
        """Whether the job is held now: stopped for another job's phase, or waiting for its own turn."""
        paused = self.gate.is_paused(self.channel.pid)
        if paused != self.was_paused:
            self._log("paused while another job's benchmark runs alone" if paused else "resumed")
        self.was_paused = paused
        held = paused or self.waiting
        if self.waiting and may_enter:
            self._try_enter()
        return held

    def _try_enter(self) -> None:
        paused = self.gate.try_enter(self.channel.pid)
        if paused is None:
            if not self.announced:
                self.announced = True
                self._log("waiting: another job's timed phase runs alone")
            return
        self.waiting, self.alone = False, True
        self.paused_for.update(paused)
        if self.niced:  # measured at the priority it is served at
            self.niced = not set_tree_nice(self.channel.pid, 0)
            if self.niced:
                self._log(f"its priority could not be raised back from nice {PREPARE_NICE}: "
                          "the speed was measured at that priority", "warning")
        self.channel.send("go")  # everything else is paused now

    def phase(self, event: Phase) -> None:
        if self.alone and not event.alone:
            self.gate.release(self.channel.pid)
            self.alone = False
        # every phase that runs alone is answered with a go (the measuring job is let in again at once)
        self.waiting, self.announced = event.alone, False

    def _log(self, message: str, level: str = "info") -> None:
        if self.on_event:
            self.on_event(Log(message, level=level))  # type: ignore[arg-type]


class _Supervision:
    """One job's run, seen from the parent: the loop that composes the channel, the turn, the clock and the
    memory watch, and the outcome it leaves."""

    def __init__(self, runner: JobRunner, job: JobSpec, proc: subprocess.Popen[str], niced: bool,
                 on_event: Callable[[JobEvent], None] | None, cancel: threading.Event | None,
                 on_memory: Callable[[MemorySample], None] | None, by_growth: bool = False) -> None:
        now = time.monotonic()
        self.runner, self.job, self.on_event, self.cancel = runner, job, on_event, cancel
        self.channel = WorkerChannel(proc)
        self.turn = _Turn(runner.gate, self.channel, niced, on_event)
        self.clock = PhaseClock(job.phase_timeout_s, now)
        self.watch = MemoryWatch(proc.pid, runner.sampler, runner.guard_pool, runner.interval_s, now, on_memory,
                                 by_growth=by_growth)
        self.completed: Completed | None = None
        self.error: str | None = None
        self.stop_reason: tuple[JobStatus, str] | None = None

    def loop(self) -> None:
        pid = self.channel.pid
        while not self.channel.finished:
            now = time.monotonic()
            held = self.turn.tick(may_enter=self.stop_reason is None)
            self.clock.tick(now, waiting=held, others_running=self.runner.gate.others_running(pid))
            if self.watch.due(now):
                sample, stop = self.watch.take(now, self.clock.phase)
                if stop is not None:
                    self._stop(JobStatus.STOPPED, self._guard_message(sample, stop.reason), graceful=False)
            if self.cancel is not None and self.cancel.is_set():
                self._stop(JobStatus.CANCELLED, "Cancelled by the user.")
            if self.clock.stalled(now):
                self._stop(JobStatus.TIMEOUT, f"The {self.clock.phase} phase made no progress for "
                                              f"{self.job.phase_timeout_s:g} s; the worker was stopped.")
            line = self.channel.next_line(self.watch.next_sample_s - time.monotonic())
            if line:
                self._handle(line)

    def _stop(self, status: JobStatus, message: str, graceful: bool = True) -> None:
        """The first reason to stop wins; memory running out allows no grace, nor does a paused worker."""
        if self.stop_reason is not None:
            return
        self.stop_reason = (status, message)
        self.channel.stop(graceful=graceful and not self.runner.gate.is_paused(self.channel.pid))

    def _handle(self, line: str) -> None:
        try:
            event = event_from_line(line)
        except ValueError:
            return  # a stray print from a library; the log has stderr
        now = time.monotonic()
        self.clock.activity(now)
        if isinstance(event, Completed):
            self.completed = event
            return
        if isinstance(event, ReuseQuery):
            self.channel.send(reuse_answer_line(self._reusable(event)))
            return
        if isinstance(event, Phase):
            self.clock.enter(event.name, now)
            self.turn.phase(event)
        elif isinstance(event, Failed) and self.error is None:
            self.error = event.message
        if self.on_event:
            self.on_event(event)

    def _reusable(self, query: ReuseQuery) -> RunRecord | None:
        """An earlier measurement for the worker's key, looked up here: the worker never opens the store, and a
        store that cannot be read costs the shortcut, never the job."""
        import sqlite3

        from qexplorer.core import reuse
        from qexplorer.core.errors import UserError
        from qexplorer.core.results import ResultsStore

        try:
            stored = reuse.find_reusable(ResultsStore.in_dir(Path(self.job.data_dir)), query.model_path,
                                         query.precision, query.key, wants_load=self.job.load is not None)
        except (UserError, sqlite3.Error, OSError) as exc:
            if self.on_event:
                self.on_event(Log(f"no earlier measurement could be looked up ({str(exc)[:200]}); "
                                  "measuring anew", level="warning"))
            return None
        return reuse.reused(stored) if stored is not None else None

    def _guard_message(self, sample: MemorySample, reason: str) -> str:
        job = self.job
        planned = (f"; the plan predicted a peak of {format_gib(job.planned_peak_bytes)}"
                   if job.planned_peak_bytes else "")
        gpu = f" + {format_gib(sample.gpu_bytes)} on the GPU" if sample.gpu_bytes else ""
        message = (f"Stopped {job.precision} to protect the machine: {reason} while the job held "
                   f"{format_gib(sample.rss_bytes)}{gpu} during {sample.phase}{planned}.")
        if self.watch.gpu_unified:
            message += f" {UNIFIED_KILL_NOTE}"
        return message

    def outcome(self, log_path: Path) -> JobOutcome:
        phases = self.clock.close(time.monotonic())
        watch, code = self.watch, self.channel.proc.returncode
        status, error, completed = JobStatus.OK, self.error, self.completed
        if self.stop_reason is not None:
            (status, error), completed = self.stop_reason, None
        elif completed is None or code != 0:
            status, error, completed = JobStatus.FAILED, error or describe_exit(code), None
        record = export = None
        if completed is not None and isinstance(completed.record, RunRecord):
            record = self._finish(completed.record, phases)
        elif completed is not None:
            export = completed.record
        return JobOutcome(job=self.job, status=status, error=error, record=record, export=export,
                          peak_rss_bytes=watch.peak_rss_bytes, peak_gpu_bytes=watch.peak_gpu_bytes,
                          gpu_source=watch.gpu_source, exit_code=code, log_path=log_path,
                          memory=tuple(watch.samples), phase_seconds=phases)

    def _finish(self, record: RunRecord, phases: tuple[tuple[str, float], ...]) -> RunRecord:
        """What only the parent knows, added to the worker's record: peaks seen from outside, the phases' costs
        without waiting, the real GPU's kind and the screen's profile, who was paused and what ran shared."""
        if record.reused_from:
            return record  # an earlier measurement shown again (core.reuse): its own figures stand
        watch = self.watch
        # the child's own high-water mark catches peaks between samples
        peak_rss = max(record.memory.peak_rss_bytes or 0, watch.peak_rss_bytes)
        record = record.with_memory(peak_rss_bytes=peak_rss, peak_gpu_bytes=watch.peak_gpu_bytes,
                                    peak_gpu_source=watch.gpu_source or None,
                                    server_gpu_bytes=watch.server_gpu_bytes)
        if record.hardware is not None:
            record = replace(record, hardware=replace(record.hardware, gpu_unified=watch.gpu_unified,
                                                      shown_profile=self.job.shown_profile))
        return replace(record, timings=timings_from(phases), paused_for_timing=tuple(sorted(self.turn.paused_for)),
                       shared_phases=tuple(self.clock.shared))


def failure_record(outcome: JobOutcome) -> RunRecord:
    """What is kept of a job that did not finish: who it was, what the plan said, the memory it reached."""
    from qexplorer.core.precisions import BY_KEY

    job = outcome.job
    precision = BY_KEY.get(job.precision)
    return RunRecord(
        model=ModelIdentity(name=job.model_name or job.model_ref, path=job.model_path or job.model_ref,
                            ref=job.model_ref),
        precision=job.precision, precision_label=precision.label if precision else job.precision,
        family=precision.family if precision else Family.TORCH, bench=job.bench,
    ).with_memory(peak_rss_bytes=outcome.peak_rss_bytes, peak_gpu_bytes=outcome.peak_gpu_bytes,
                  peak_gpu_source=outcome.gpu_source or None,
                  planned_peak_bytes=job.planned_peak_bytes, planned_total_bytes=job.planned_total_bytes)


def remove_container(container: ContainerVllm, worker_pid: int) -> None:
    """Remove the container a worker's vLLM ran in (none: nothing happens)."""
    try:
        subprocess.run(container.stop_argv(ContainerVllm.name_for(worker_pid)), capture_output=True, timeout=60,
                       check=False)
    except (OSError, subprocess.TimeoutExpired):
        pass
