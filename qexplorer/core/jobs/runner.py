"""One job = one child process, watched from outside.

:class:`JobRunner` starts ``python -m qexplorer.worker`` with the job on stdin
(an argument list, never a shell string), reads its JSON-line events on a
thread, and once per sample period:

* measures the child's memory from outside (RSS of the child and its children;
  the GPU memory NVML attributes to that process tree - or, in a container where
  NVML lists host PIDs, the device's growth since the job started) and keeps the
  peaks;
* runs the **memory guard** (:mod:`qexplorer.core.jobs.guard`: headroom level,
  its trend, free VRAM) on **real** telemetry - ``--simulate`` changes what is
  drawn, never what guards a real job - and stops the child at once when it
  says so, with why and what the plan had predicted. On unified memory this is
  what keeps the box from freezing. While the job loads it samples at 4 Hz;
* enforces a per-phase timeout and honours cancellation.

A crash, an OOM kill or a cancel ends the child only; memory goes back to the
system when it exits.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from qexplorer.core.jobs.events import Completed, Failed, JobEvent, Log, Phase, event_from_line
from qexplorer.core.jobs.guard import GuardSample, MemoryGuard
from qexplorer.core.jobs.overlap import PREPARE_NICE, TimedGate, can_restore_priority, set_tree_nice
from qexplorer.core.jobs.record import ExportRecord, ModelIdentity, RunRecord
from qexplorer.core.jobs.spec import JobSpec
from qexplorer.core.kinds import Family, JobStatus
from qexplorer.core.telemetry import TelemetrySampler, TelemetrySnapshot
from qexplorer.core.units import format_gib

CALIBRATE_PHASE = "calibrate"  # the roofline's bandwidth test: its buffers are not the job's memory

TERMINATE_GRACE_S = 3.0
SERVER_STOP_S = 15.0  # a worker that runs vLLM stops it on SIGTERM before it exits


@dataclass(frozen=True)
class MemorySample:
    elapsed_s: float
    rss_bytes: int
    gpu_bytes: int | None
    headroom_bytes: int | None
    phase: str
    gpu_source: str = ""  # how gpu_bytes was attributed to the job


GPU_BY_PID = "NVML per-process (the job's process tree)"
GPU_BY_DELTA = "NVML device growth since the job started (container: NVML lists host PIDs)"


def attribute_gpu(snapshot: TelemetrySnapshot, tree_pids: set[int], baseline_used: int | None) -> tuple[int | None, str]:
    """The GPU memory that is the job's: NVML's per-process figures for its process tree; where NVML's PIDs are
    another namespace's (a container), the growth of the devices' used memory since the job started."""
    if not snapshot.devices:
        return None, ""
    matched = [p.gpu_bytes for p in snapshot.processes if p.pid in tree_pids and p.gpu_bytes is not None]
    if matched or not snapshot.foreign_gpu_pids:
        return sum(matched), GPU_BY_PID
    used = devices_used_bytes(snapshot)
    if used is None or baseline_used is None:
        return None, GPU_BY_DELTA
    return max(0, used - baseline_used), GPU_BY_DELTA


def devices_used_bytes(snapshot: TelemetrySnapshot) -> int | None:
    values = [d.gpu_used_bytes.value for d in snapshot.devices]
    return None if any(v is None for v in values) else int(sum(values))


def discrete_free_bytes(snapshot: TelemetrySnapshot) -> int | None:
    """The smallest free memory of the discrete cards (the one a job runs out of first); None on unified memory."""
    values = [d.headroom_bytes.value for d in snapshot.devices if d.unified is False and d.headroom_bytes.available]
    return int(min(values)) if values else None


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


def tree_rss(pid: int) -> tuple[int, set[int]]:
    """RSS of a process and its descendants (a vLLM server the worker started), and their PIDs."""
    import psutil

    try:
        proc = psutil.Process(pid)
        total, pids = proc.memory_info().rss, {pid}
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
                pids.add(child.pid)
            except psutil.Error:
                continue
        return int(total), pids
    except psutil.Error:
        return 0, {pid}


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
    PIDs are qexplorer's jobs."""

    def __init__(self, sampler: TelemetrySampler | None = None, interval_s: float = 1.0,
                 python: str = sys.executable, log_dir: Path | None = None,
                 extra_env: dict[str, str] | None = None, worker_command: list[str] | None = None,
                 display: TelemetrySampler | None = None, guard: type[MemoryGuard] = MemoryGuard) -> None:
        self.sampler = sampler
        self.display = display
        self.guard_factory = guard
        # The seam for fault tests: a different child (one that hangs, say) in place of the worker.
        self.worker_command = worker_command or [python, "-m", "qexplorer.worker"]
        self.interval_s = interval_s
        self.python = python
        self.log_dir = log_dir
        self.extra_env = extra_env or {}
        self.current_pid: int | None = None
        self._own_lock = threading.Lock()
        self._can_nice: bool | None = None  # may a preparing job be niced and raised back (overlap.PREPARE_NICE)
        self.gate = TimedGate()  # shared by every job this runner runs: timed phases run alone (jobs.overlap)
        self._gpu_unified: bool | None = None

    def _spawn(self, job: JobSpec, log_path: Path) -> subprocess.Popen[str]:
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
        # one line; stdin stays open for the go after each timed phase (jobs.overlap), closed when the job ends
        _write_line(proc, json.dumps(job.to_json()))
        return proc

    def run(self, job: JobSpec, on_event: Callable[[JobEvent], None] | None = None,
            cancel: threading.Event | None = None,
            on_memory: Callable[[MemorySample], None] | None = None) -> JobOutcome:
        log_dir = self.log_dir or Path(job.data_dir) / "logs"
        log_path = log_dir / f"job-{int(time.time() * 1000)}-{job.precision}.log"
        proc = None
        while proc is None:  # no worker starts while another job runs a timed phase
            proc = self.gate.spawn(job.precision, lambda: self._spawn(job, log_path), lambda p: p.pid)
            if proc is None:
                if cancel is not None and cancel.is_set():
                    return JobOutcome(job=job, status=JobStatus.CANCELLED, error="Cancelled by the user.")
                time.sleep(0.05)
        self.current_pid = proc.pid  # the newest worker (tests and the CLI's interrupt use it)
        niced = bool(job.prepare_threads) and self._may_nice() and set_tree_nice(proc.pid, PREPARE_NICE)
        watchers = {id(s): s for s in (self.sampler, self.display) if s is not None}.values()
        with self._own_lock:  # two jobs' threads may start and end at once
            for watcher in watchers:
                watcher.own_pids = watcher.own_pids | {proc.pid}
        guard = self.guard_factory()
        gpu_baseline: list[int | None] = [None]  # this job's own: two jobs may run at once
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=read, name=f"job-{proc.pid}-reader", daemon=True)
        reader.start()
        memory: list[MemorySample] = []
        completed: Completed | None = None
        error: str | None = None
        peak_rss, peak_gpu, gpu_source = 0, None, ""
        started = last_activity = time.monotonic()
        next_sample = started
        phase = "start"
        phase_started = started
        phases: list[tuple[str, float]] = []
        stop_reason: tuple[JobStatus, str] | None = None
        stream_done = False
        waiting_go = holding = announced_wait = was_paused = False  # announced a timed phase / holds the slot
        paused_for: set[str] = set()  # jobs paused while this one's timed phases ran
        shared: list[str] = []  # this job's phases during which another job's worker ran
        held_s = 0.0  # of the current phase: paused for another job's timing, or waiting for the timed slot
        last_tick = started
        try:
            while not stream_done or proc.poll() is None:
                now = time.monotonic()
                paused_now = self.gate.is_paused(proc.pid)
                if paused_now != was_paused and on_event:
                    on_event(Log("paused while another job's benchmark runs alone" if paused_now else "resumed"))
                was_paused = paused_now
                if paused_now:
                    last_activity = now  # a paused job makes no progress by design: not a stall
                    held_s += now - last_tick
                elif waiting_go:
                    held_s += now - last_tick
                elif phase not in shared and self.gate.others_running(proc.pid):
                    shared.append(phase)
                if waiting_go and stop_reason is None:
                    paused = self.gate.try_enter(proc.pid)
                    if paused is not None:
                        waiting_go, holding = False, True
                        paused_for.update(paused)
                        if niced:  # measured at the priority it is served at
                            niced = not set_tree_nice(proc.pid, 0)
                            if niced and on_event:
                                on_event(Log(f"its priority could not be raised back from nice {PREPARE_NICE}: "
                                             "the speed was measured at that priority", level="warning"))
                        _write_line(proc, "go")  # everything else is paused now
                    elif not announced_wait and on_event:
                        announced_wait = True
                        on_event(Log("waiting: another job's timed phase runs alone"))
                last_tick = now
                if now >= next_sample:
                    next_sample = now + guard.interval_s(phase, self.interval_s)
                    sample, vram_free = self._measure(proc.pid, now - started, phase, gpu_baseline)
                    memory.append(sample)
                    if phase != CALIBRATE_PHASE:
                        peak_rss = max(peak_rss, sample.rss_bytes)
                        if sample.gpu_bytes is not None:
                            peak_gpu, gpu_source = max(peak_gpu or 0, sample.gpu_bytes), sample.gpu_source
                    if on_memory:
                        on_memory(sample)
                    stop = guard.check(GuardSample(sample.elapsed_s, sample.headroom_bytes, vram_free,
                                                   sample.gpu_bytes))
                    if stop_reason is None and stop is not None:
                        stop_reason = (JobStatus.STOPPED, self._guard_message(job, sample, stop.reason))
                        self._stop(proc, graceful=False)  # memory is running out: no grace period
                if stop_reason is None and cancel is not None and cancel.is_set():
                    stop_reason = (JobStatus.CANCELLED, "Cancelled by the user.")
                    self._stop(proc, graceful=not self.gate.is_paused(proc.pid))  # paused: it must not wake
                if stop_reason is None and now - last_activity > job.phase_timeout_s:
                    stop_reason = (JobStatus.TIMEOUT, f"The {phase} phase made no progress for "
                                                      f"{job.phase_timeout_s:g} s; the worker was stopped.")
                    self._stop(proc, graceful=not self.gate.is_paused(proc.pid))
                if stream_done:
                    try:
                        proc.wait(timeout=max(0.01, next_sample - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
                    continue
                try:
                    line = lines.get(timeout=max(0.01, next_sample - time.monotonic()))
                except queue.Empty:
                    continue
                if line is None:
                    stream_done = True
                    continue
                try:
                    event = event_from_line(line)
                except ValueError:
                    continue  # a stray print from a library; the log has stderr
                last_activity = time.monotonic()
                if isinstance(event, Completed):
                    completed = event
                    continue
                if isinstance(event, Phase):
                    phases.extend(_split(phase, last_activity - phase_started, held_s))
                    phase, phase_started, held_s, announced_wait = event.name, last_activity, 0.0, False
                    if holding and not event.timed:
                        self.gate.release(proc.pid)
                        holding = False
                    waiting_go = event.timed and not holding
                elif isinstance(event, Failed) and error is None:
                    error = event.message
                if on_event:
                    on_event(event)
        finally:
            self.gate.leave(proc.pid)  # continues it first if it was paused: it must see the SIGTERM
            if proc.poll() is None:
                self._stop(proc)
            _kill_group(proc.pid)  # whatever a crashed worker left behind (a vLLM server) goes too
            reader.join(timeout=2)
            if self.current_pid == proc.pid:
                self.current_pid = None
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
            with self._own_lock:
                for watcher in watchers:
                    watcher.own_pids = watcher.own_pids - {proc.pid}
        phases.extend(_split(phase, time.monotonic() - phase_started, held_s))
        if stop_reason is not None:
            status, error = stop_reason
            completed = None
        elif completed is not None and proc.returncode == 0:
            status = JobStatus.OK
        else:
            status = JobStatus.FAILED
            error = error or describe_exit(proc.returncode)
            completed = None
        record = export = None
        if completed is not None and isinstance(completed.record, RunRecord) and completed.record.reused_from:
            record = completed.record  # an earlier measurement shown again (core.reuse): its own figures stand
        elif completed is not None and isinstance(completed.record, RunRecord):
            # the child's own high-water mark catches peaks between samples
            peak_rss = max(completed.record.memory.peak_rss_bytes or 0, peak_rss)
            record = completed.record.with_memory(peak_rss_bytes=peak_rss, peak_gpu_bytes=peak_gpu,
                                                  peak_gpu_source=gpu_source or None)
            if record.hardware is not None:  # what only the parent knows: the real GPU's kind, the screen's profile
                record = replace(record, hardware=replace(record.hardware, gpu_unified=self._gpu_unified,
                                                          shown_profile=job.shown_profile))
            record = replace(record, paused_for_timing=tuple(sorted(paused_for)), shared_phases=tuple(shared))
        elif completed is not None:
            export = completed.record
        return JobOutcome(job=job, status=status, error=error, record=record, export=export,
                          peak_rss_bytes=peak_rss, peak_gpu_bytes=peak_gpu, gpu_source=gpu_source,
                          exit_code=proc.returncode,
                          log_path=log_path, memory=tuple(memory), phase_seconds=tuple(phases))

    def _may_nice(self) -> bool:
        if self._can_nice is None:
            self._can_nice = can_restore_priority()
        return self._can_nice

    def _measure(self, pid: int, elapsed_s: float, phase: str,
                 gpu_baseline: list[int | None]) -> tuple[MemorySample, int | None]:
        """One sample of the job's memory, and the discrete cards' free memory for the guard."""
        rss, pids = tree_rss(pid)
        gpu = headroom = vram_free = None
        source = ""
        if self.sampler is not None:
            snapshot = self.sampler.sample()
            value = snapshot.host_headroom_bytes.value
            headroom = None if value is None else int(value)
            if gpu_baseline[0] is None:
                gpu_baseline[0] = devices_used_bytes(snapshot)
            self._gpu_unified = snapshot.unified if snapshot.devices else None
            gpu, source = attribute_gpu(snapshot, pids, gpu_baseline[0])
            vram_free = discrete_free_bytes(snapshot)
        return MemorySample(elapsed_s, rss, gpu, headroom, phase, source), vram_free

    def _guard_message(self, job: JobSpec, sample: MemorySample, reason: str) -> str:
        planned = (f"; the plan predicted a peak of {format_gib(job.planned_peak_bytes)}"
                   if job.planned_peak_bytes else "")
        gpu = f" + {format_gib(sample.gpu_bytes)} on the GPU" if sample.gpu_bytes else ""
        return (f"Stopped {job.precision} to protect the machine: {reason} while the job held "
                f"{format_gib(sample.rss_bytes)}{gpu} during {sample.phase}{planned}.")

    @staticmethod
    def _stop(proc: subprocess.Popen[str], graceful: bool = True) -> None:
        """SIGTERM, a short grace, then SIGKILL - to the worker's whole process group, so that a server it
        started (vLLM) goes with it. A worker given SIGTERM stops its server itself first."""
        if graceful and proc.poll() is None:
            try:
                proc.terminate()
                proc.wait(timeout=TERMINATE_GRACE_S + SERVER_STOP_S)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        _kill_group(proc.pid)
        if proc.poll() is None:
            proc.wait(timeout=10)


HELD_PHASE = "held"  # time a job spent paused for another's timed phase or waiting for its own turn


def _split(phase: str, seconds: float, held_s: float) -> list[tuple[str, float]]:
    """A phase's wall time without the time it was held, which is listed on its own (not the phase's cost)."""
    held_s = min(held_s, seconds)
    if held_s <= 0.05:  # the sampling loop's granularity: not worth a row
        return [(phase, seconds)]
    return [(phase, seconds - held_s), (HELD_PHASE, held_s)]


def _write_line(proc: subprocess.Popen[str], line: str) -> None:
    """One line to a worker's stdin: the job, then a go after each timed phase it announces."""
    if proc.stdin is None:
        return
    try:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
    except (BrokenPipeError, OSError):
        pass  # it exited (at once, or meanwhile); its exit code says why


def _kill_group(pgid: int) -> None:
    """SIGKILL whatever is left of the job's process group (the worker is its leader: start_new_session)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


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
