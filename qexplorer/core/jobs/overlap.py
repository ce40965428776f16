"""Overlap only what is not timed: two workers at once, never beside a timed phase.

While one job runs a phase that produces no timed figure (dequantize, quantize,
convert, a reference or quality pass, a vLLM start), the next jobs (up to
:data:`MAX_WORKERS` workers in all) prepare in their own workers, up to their
first phase that runs alone. There a job waits until no other job is
*measuring* (from its first such phase to its end: the benchmark, its log-prob
and quality passes, the bandwidth test); among jobs that are ready, the oldest
goes first. So measurements
never share the CPU, and a job whose preparation is short (a GGUF
re-quantization) is measured while a slow one (a vLLM start) still prepares.
A phase that runs alone (``alone`` in :mod:`qexplorer.core.domain.phases`: the speed benchmark, the
bandwidth test) does so this way:

* the worker announces it (a ``Phase`` event) and then waits for one line on its
  stdin before it starts the clock;
* the parent asks the :class:`TimedGate` to let it in. The gate lets one job
  measure at a time, and before the phase starts it **stops every other
  worker's process group** (SIGSTOP: the worker and the vLLM server it
  started). Only then does the parent write the line;
* when that phase ends (its next phase, or its end), the gate continues the
  others (SIGCONT); the job stays the measuring one until it ends.

A stopped process uses no CPU, so nothing of another job runs while a figure is
timed; the record says which jobs were paused for it (``paused_for_timing``) and
which of its own untimed phases ran beside another job (``shared_phases``).
Two qexplorer processes (the app and a CLI run) do not measure at once either:
the measuring job holds a per-user file lock (:func:`machine_lock_path`).
Only jobs whose planned peaks fit the live headroom together are overlapped
(:func:`fits_together`).
"""

from __future__ import annotations

import fcntl
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from qexplorer.core.proc import signal_group

T = TypeVar("T")
TOGETHER_SHARE = 0.8  # the running jobs' planned peaks together may take at most this share of the headroom
# One measuring, one preparing. Measured on 2 cores (scripts/bench_jobs.py decision): a third worker made the
# default ladder slower (249 s against 218 s), every PyTorch pass slowed several-fold by oversubscription.
MAX_WORKERS = 2
PREPARE_THREADS = 1  # a job started beside another prepares on one thread (JobSpec.prepare_threads)
PREPARE_NICE = 10  # a preparing job yields the CPU to the measuring one; back to 0 before it measures


class TimedGate:
    """Which job is measuring, and the pausing of everyone else while it runs a phase alone. One state: the
    *measuring* job, from its first phase that runs alone to its end; while it is inside such a phase
    (``running_alone``) every other worker is stopped. Thread-safe: each job's runner thread calls it.
    ``signal_group`` is the seam for tests (default: ``os.killpg``)."""

    def __init__(self, signal_group: Callable[[int, int], None] = signal_group,
                 machine_lock: Path | None = None) -> None:
        self._signal = signal_group
        self._machine_lock = machine_lock  # a file every qexplorer process of this user locks while it measures
        self._machine_fd: int | None = None
        self._lock = threading.Lock()
        self._workers: dict[int, str] = {}  # process group → the job's label, in the order they started
        self._measuring: int | None = None
        self._alone = False  # the measuring job is inside a phase that runs alone: the others are stopped
        self._waiting: set[int] = set()  # announced a phase that runs alone, not let in yet
        self._paused: set[int] = set()

    @property
    def running_alone(self) -> bool:
        with self._lock:
            return self._alone

    def spawn(self, label: str, start: Callable[[], T], pgid_of: Callable[[T], int]) -> T | None:
        """Start a worker and register it, unless a phase runs alone now (then None: try again later). The
        lock is held while it starts, so no such phase can begin half-way through."""
        with self._lock:
            if self._alone:
                return None
            started = start()
            self._workers[pgid_of(started)] = label
            return started

    def try_enter(self, pgid: int) -> tuple[str, ...] | None:
        """Run a phase alone: every other worker is stopped first; returns the labels of those paused. None while
        another job is measuring (two measurements never share the CPU), or while an older job is ready too (the
        oldest ready job goes first). The measuring job itself is always let in again (its bandwidth test after
        its benchmark)."""
        with self._lock:
            if self._measuring is not None and self._measuring != pgid:
                self._waiting.add(pgid)
                return None
            if self._measuring is None:
                order = list(self._workers)
                older = order[:order.index(pgid)] if pgid in self._workers else []
                if self._waiting.intersection(older) or not self._lock_machine():
                    self._waiting.add(pgid)
                    return None
            self._waiting.discard(pgid)
            self._measuring, self._alone = pgid, True
            for other in self._workers:
                if other != pgid and other not in self._paused:
                    self._signal(other, signal.SIGSTOP)
                    self._paused.add(other)
            return tuple(self._workers[p] for p in sorted(self._paused))

    def release(self, pgid: int) -> None:
        """The measuring job's phase that ran alone ended: continue everyone it paused (it stays measuring)."""
        with self._lock:
            if self._measuring != pgid or not self._alone:
                return
            self._alone = False
            for other in sorted(self._paused):
                self._signal(other, signal.SIGCONT)
            self._paused.clear()

    def leave(self, pgid: int) -> None:
        """A worker ended (or is being stopped): let go of the gate if it was measuring, and forget it."""
        self.release(pgid)
        with self._lock:
            self._workers.pop(pgid, None)
            self._waiting.discard(pgid)
            if self._measuring == pgid:
                self._measuring = None
                self._unlock_machine()
            if pgid in self._paused:
                self._paused.discard(pgid)
                self._signal(pgid, signal.SIGCONT)  # a stopped process cannot act on the SIGTERM that follows

    def _lock_machine(self) -> bool:
        """Another qexplorer process (the app beside a CLI run) may be measuring: one flock for all of them,
        taken without waiting (the caller retries), released when the measuring job ends or its process dies."""
        if self._machine_lock is None or self._machine_fd is not None:
            return True
        fd = os.open(self._machine_lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._machine_fd = fd
        return True

    def _unlock_machine(self) -> None:
        if self._machine_fd is not None:
            fcntl.flock(self._machine_fd, fcntl.LOCK_UN)
            os.close(self._machine_fd)
            self._machine_fd = None

    def is_paused(self, pgid: int) -> bool:
        with self._lock:
            return pgid in self._paused

    def others_running(self, pgid: int) -> bool:
        """Whether another worker is running (not paused) beside this one now."""
        with self._lock:
            return any(p != pgid and p not in self._paused for p in self._workers)


def machine_lock_path() -> Path:
    """The lock file every qexplorer process of this user takes while it measures (one per user and machine)."""
    return Path(tempfile.gettempdir()) / f"qexplorer-{os.getuid()}-measuring.lock"


def set_tree_nice(pid: int, value: int) -> bool:
    """Set the scheduling priority of a process and all its descendants (a worker and its vLLM server);
    False where that is not allowed (raising it back needs root or CAP_SYS_NICE)."""
    import psutil

    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                proc.nice(value)
            except psutil.NoSuchProcess:
                continue
        return True
    except (psutil.AccessDenied, PermissionError):
        return False
    except psutil.NoSuchProcess:
        return True


def can_restore_priority() -> bool:
    """Whether this user may lower a process's nice value back to 0: only then do preparing jobs run niced
    (a job must never be measured at a lower priority than the one it is served at)."""
    import subprocess
    import sys

    probe = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        return set_tree_nice(probe.pid, 1) and set_tree_nice(probe.pid, 0)
    finally:
        probe.kill()
        probe.wait()


def fits_together(planned_peaks: Iterable[int | None], headroom_bytes: int | None) -> bool:
    """Whether jobs may run at once: every planned peak known, and their sum within a share of the headroom the
    caller measured (the queue passes the host's: on unified memory that is the pool)."""
    peaks = list(planned_peaks)
    if headroom_bytes is None or any(p is None for p in peaks):
        return False
    return sum(int(p) for p in peaks if p is not None) <= TOGETHER_SHARE * headroom_bytes


def fits_on_card(running_planned_gpu: Iterable[int | None], running_gpu_now: Iterable[int | None],
                 new_planned_gpu: int | None, vram_free_bytes: int | None) -> bool:
    """Whether a job may start beside others on a discrete card (review J4, issue 23 item 6): the planned VRAM
    of all of them within a share of the card's memory the running jobs do not hold, and - once the running jobs
    grow to their plans - still room for the new job's vLLM to pass its start-up check (its plan plus
    ``START_MARGIN_BYTES`` free; vLLM's ``v1/worker/utils.py`` l. 724-768). A job with no GPU plan adds nothing."""
    from qexplorer.core.serving.vllm_launch import START_MARGIN_BYTES

    pairs = [(int(p or 0), int(g or 0)) for p, g in zip(running_planned_gpu, running_gpu_now, strict=True)]
    planned = sum(p for p, _ in pairs)
    if not planned and not new_planned_gpu:
        return True
    if vram_free_bytes is None:
        return False  # a GPU plan and no reading of the card: one at a time
    card = vram_free_bytes + sum(g for _, g in pairs)  # what the running jobs and the new one have between them
    new = int(new_planned_gpu or 0)
    if planned + new > TOGETHER_SHARE * card:
        return False
    # each running job may still grow to its own plan (one above its plan frees nothing for another)
    free_at_start = vram_free_bytes - sum(max(0, p - g) for p, g in pairs)
    return not new or free_at_start >= new + START_MARGIN_BYTES
