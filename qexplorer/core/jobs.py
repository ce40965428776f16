"""Jobs: each one a child process, watched from outside.

:class:`JobRunner` starts ``python -m qexplorer.worker`` with the job on stdin
(an argument list, never a shell string), reads its JSON-line events on a
thread, and once per sample period:

* measures the child's memory from outside (RSS of the child and its children;
  its NVML per-process allocation when a GPU exists) and keeps the peak;
* runs the **memory guard**: if headroom (MemAvailable − reserve, FACTS §1)
  falls below zero, the child is stopped at once and the outcome says why and
  what the plan had predicted. On unified memory this is what keeps the box
  from freezing;
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qexplorer.core import events
from qexplorer.core.pipeline import CALIBRATE_PHASE, JobSpec
from qexplorer.core.precisions import get as get_precision
from qexplorer.core.results import ResultsStore
from qexplorer.core.telemetry import TelemetrySampler
from qexplorer.core.units import format_gib

TERMINATE_GRACE_S = 3.0


@dataclass(frozen=True)
class MemorySample:
    elapsed_s: float
    rss_bytes: int
    gpu_bytes: int | None
    headroom_bytes: int | None
    phase: str


@dataclass
class JobOutcome:
    job: JobSpec
    status: str  # "ok", "failed", "cancelled", "stopped" (guard), "timeout"
    record: dict[str, Any] | None
    error: str | None
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int | None = None
    exit_code: int | None = None
    log_path: Path | None = None
    memory: list[MemorySample] = field(default_factory=list)
    events: list[events.Event] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                continue
        return int(total)
    except psutil.Error:
        return 0


def describe_exit(code: int | None) -> str:
    if code is None:
        return "the worker did not exit"
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = " - the kernel's OOM killer does this when memory runs out" if -code == signal.SIGKILL else ""
        return f"the worker was killed by {name}{hint}"
    return f"the worker exited with code {code} without a result"


class JobRunner:
    def __init__(self, sampler: TelemetrySampler | None = None, interval_s: float = 1.0,
                 python: str = sys.executable, log_dir: Path | None = None,
                 extra_env: dict[str, str] | None = None, worker_command: list[str] | None = None) -> None:
        self.sampler = sampler
        # The seam for fault tests: a different child (one that hangs, say) in place of the worker.
        self.worker_command = worker_command or [python, "-m", "qexplorer.worker"]
        self.interval_s = interval_s
        self.python = python
        self.log_dir = log_dir
        self.extra_env = extra_env or {}
        self.current_pid: int | None = None

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
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(job.to_json()))
        proc.stdin.close()
        return proc

    def run(self, job: JobSpec, on_event: Callable[[events.Event], None] | None = None,
            cancel: threading.Event | None = None,
            on_memory: Callable[[MemorySample], None] | None = None) -> JobOutcome:
        log_dir = self.log_dir or Path(job.data_dir) / "logs"
        log_path = log_dir / f"job-{int(time.time() * 1000)}-{job.precision}.log"
        proc = self._spawn(job, log_path)
        self.current_pid = proc.pid
        if self.sampler is not None:
            self.sampler.own_pids = self.sampler.own_pids | {proc.pid}
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=read, name=f"job-{proc.pid}-reader", daemon=True)
        reader.start()
        outcome = JobOutcome(job=job, status="running", record=None, error=None, log_path=log_path)
        started = last_activity = time.monotonic()
        next_sample = started
        phase = "start"
        stop_reason: tuple[str, str] | None = None
        stream_done = False
        try:
            while not stream_done or proc.poll() is None:
                now = time.monotonic()
                if now >= next_sample:
                    next_sample = now + self.interval_s
                    sample = self._measure(proc.pid, now - started, phase)
                    outcome.memory.append(sample)
                    if phase != CALIBRATE_PHASE:  # bandwidth buffers are not the job's memory
                        outcome.peak_rss_bytes = max(outcome.peak_rss_bytes, sample.rss_bytes)
                    if sample.gpu_bytes is not None:
                        outcome.peak_gpu_bytes = max(outcome.peak_gpu_bytes or 0, sample.gpu_bytes)
                    if on_memory:
                        on_memory(sample)
                    if stop_reason is None and sample.headroom_bytes is not None and sample.headroom_bytes < 0:
                        stop_reason = ("stopped", self._guard_message(job, sample))
                        self._stop(proc)
                if stop_reason is None and cancel is not None and cancel.is_set():
                    stop_reason = ("cancelled", "Cancelled by the user.")
                    self._stop(proc)
                if stop_reason is None and now - last_activity > job.phase_timeout_s:
                    stop_reason = ("timeout", f"The {phase} phase made no progress for "
                                              f"{job.phase_timeout_s:g} s; the worker was stopped.")
                    self._stop(proc)
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
                    event = events.Event.from_line(line)
                except ValueError:
                    continue  # a stray print from a library; the log has stderr
                last_activity = time.monotonic()
                if event.type == "phase":
                    phase = event.phase
                outcome.events.append(event)
                if event.type == "result":
                    outcome.record = dict(event.data)
                elif event.type == "error" and outcome.error is None:
                    outcome.error = event.message
                if on_event:
                    on_event(event)
        finally:
            if proc.poll() is None:
                self._stop(proc)
            reader.join(timeout=2)
            self.current_pid = None
            if self.sampler is not None:
                self.sampler.own_pids = self.sampler.own_pids - {proc.pid}
        outcome.exit_code = proc.returncode
        if stop_reason is not None:
            outcome.status, outcome.error = stop_reason
            outcome.record = None
        elif outcome.record is not None and proc.returncode == 0:
            outcome.status = "ok"
        else:
            outcome.status = "failed"
            outcome.error = outcome.error or describe_exit(proc.returncode)
        if outcome.record is not None:
            # the child's own high-water mark catches peaks between samples
            outcome.peak_rss_bytes = max(outcome.record.get("peak_rss_bytes") or 0, outcome.peak_rss_bytes)
            outcome.record["peak_rss_bytes"] = outcome.peak_rss_bytes
            outcome.record["peak_gpu_bytes"] = outcome.peak_gpu_bytes
        return outcome

    def _measure(self, pid: int, elapsed_s: float, phase: str) -> MemorySample:
        rss = _tree_rss(pid)
        gpu = headroom = None
        if self.sampler is not None:
            snapshot = self.sampler.sample()
            value = snapshot.host_headroom_bytes.value
            headroom = None if value is None else int(value)
            for proc in snapshot.processes:
                if proc.pid == pid and proc.gpu_bytes is not None:
                    gpu = proc.gpu_bytes
        return MemorySample(elapsed_s, rss, gpu, headroom, phase)

    def _guard_message(self, job: JobSpec, sample: MemorySample) -> str:
        planned = (f"; the plan predicted a peak of {format_gib(job.planned_peak_bytes)}"
                   if job.planned_peak_bytes else "")
        return (f"Stopped {job.precision} to protect the machine: headroom fell to "
                f"{format_gib(sample.headroom_bytes)} (below the safety reserve) while the job held "
                f"{format_gib(sample.rss_bytes)} during {sample.phase}{planned}.")

    @staticmethod
    def _stop(proc: subprocess.Popen[str]) -> None:
        """SIGTERM, a short grace, then SIGKILL."""
        if proc.poll() is not None:
            return
        try:
            proc.terminate()
            proc.wait(timeout=TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass


def store_outcome(store: ResultsStore, outcome: JobOutcome) -> int:
    """Keep every finished job: results with their metrics, failures with their reason."""
    if outcome.record is not None and outcome.ok:
        return store.add(outcome.record, status="ok")
    job = outcome.job
    record = {"model_ref": job.model_ref, "model_name": job.model_name or job.model_ref,
              "model_path": job.model_path or job.model_ref, "precision": job.precision,
              "family": get_precision(job.precision).family,
              "peak_rss_bytes": outcome.peak_rss_bytes, "planned_peak_bytes": outcome.job.planned_peak_bytes}
    return store.add(record, status=outcome.status, error=outcome.error)
