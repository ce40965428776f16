"""Overlap only what is not timed: two workers at once, never beside a timed phase.

While one job runs a phase that produces no timed figure (dequantize, quantize,
convert, a reference or quality pass, a vLLM start), the next jobs (up to
:data:`MAX_WORKERS` workers in all) prepare in their own workers, up to their
first timed phase. There a job waits until no other job is *measuring* (from
its first timed phase to its end: the benchmark, then its log-prob and quality
passes); among jobs that are ready, the oldest goes first. So measurements
never share the CPU, and a job whose preparation is short (a GGUF
re-quantization) is measured while a slow one (a vLLM start) still prepares.
A timed phase (:data:`~qexplorer.core.jobs.events.TIMED_PHASES`: the speed
benchmark) runs alone:

* the worker announces it (a ``Phase`` event) and then waits for one line on its
  stdin before it starts the clock;
* the parent asks the :class:`TimedGate` for the slot. The gate gives it to one
  worker at a time, and before it does it **stops every other worker's process
  group** (SIGSTOP: the worker and the vLLM server it started). Only then does
  the parent write the line;
* when the holder's timed phase ends (its next phase, or its end), the gate
  continues the others (SIGCONT).

A stopped process uses no CPU, so nothing of another job runs while a figure is
timed; the record says which jobs were paused for it (``paused_for_timing``) and
which of its own untimed phases ran beside another job (``shared_phases``).
Only jobs whose planned peaks fit the live headroom together are overlapped
(:func:`fits_together`).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
TOGETHER_SHARE = 0.8  # the running jobs' planned peaks together may take at most this share of the headroom
# One measuring, one preparing. Measured on 2 cores (scripts/bench_jobs.py decision): a third worker made the
# default ladder slower (249 s against 218 s), every PyTorch pass slowed several-fold by oversubscription.
MAX_WORKERS = 2
PREPARE_THREADS = 1  # a job started beside another prepares on one thread (JobSpec.prepare_threads)
PREPARE_NICE = 10  # a preparing job yields the CPU to the measuring one; back to 0 before it measures
# Work every job of a model shares (made once, under a lock): the next job starts only once the running one is
# past it, so that it is built on all threads rather than by a job held to one
SHARED_PHASES = frozenset({"start", "dequantize", "convert", "reference"})


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class TimedGate:
    """Who may run a timed phase now, and the pausing of everyone else while it does. Thread-safe: each job's
    runner thread calls it. ``signal_group`` is the seam for tests (default: ``os.killpg``)."""

    def __init__(self, signal_group: Callable[[int, int], None] = _signal_group) -> None:
        self._signal = signal_group
        self._lock = threading.Lock()
        self._workers: dict[int, str] = {}  # process group → the job's label
        self._holder: int | None = None  # in a timed phase now: everyone else is paused
        self._measuring: int | None = None  # past its first timed phase, until it ends
        self._waiting: set[int] = set()  # announced a timed phase, not let in yet
        self._paused: set[int] = set()

    @property
    def held(self) -> bool:
        with self._lock:
            return self._holder is not None

    def spawn(self, label: str, start: Callable[[], T], pgid_of: Callable[[T], int]) -> T | None:
        """Start a worker and register it, unless a timed phase is running (then None: try again later). The
        lock is held while it starts, so no timed phase can begin half-way through."""
        with self._lock:
            if self._holder is not None:
                return None
            started = start()
            self._workers[pgid_of(started)] = label
            return started

    def try_enter(self, pgid: int) -> tuple[str, ...] | None:
        """Take the timed slot: every other worker is stopped first. None while another job is measuring (its
        timed phase or the quality passes after it: two measurements never share the CPU), or while an older job
        is ready too (the oldest ready job goes first)."""
        with self._lock:
            if self._holder is not None and self._holder != pgid:
                return None
            if self._measuring is not None and self._measuring != pgid:
                self._waiting.add(pgid)
                return None
            order = list(self._workers)  # in the order they started
            older = order[:order.index(pgid)] if pgid in self._workers else []
            if self._waiting.intersection(older):
                self._waiting.add(pgid)
                return None
            self._waiting.discard(pgid)
            self._holder = self._measuring = pgid
            others = [p for p in self._workers if p != pgid and p not in self._paused]
            for other in others:
                self._signal(other, signal.SIGSTOP)
                self._paused.add(other)
            return tuple(self._workers[p] for p in sorted(self._paused))

    def release(self, pgid: int) -> None:
        """The holder's timed phase ended: continue everyone it paused."""
        with self._lock:
            if self._holder != pgid:
                return
            self._holder = None
            for other in sorted(self._paused):
                self._signal(other, signal.SIGCONT)
            self._paused.clear()

    def leave(self, pgid: int) -> None:
        """A worker ended (or is being stopped): let go of the slot if it held it, and forget it."""
        self.release(pgid)
        with self._lock:
            self._workers.pop(pgid, None)
            self._waiting.discard(pgid)
            if self._measuring == pgid:
                self._measuring = None
            if pgid in self._paused:
                self._paused.discard(pgid)
                self._signal(pgid, signal.SIGCONT)  # a stopped process cannot act on the SIGTERM that follows

    def is_paused(self, pgid: int) -> bool:
        with self._lock:
            return pgid in self._paused

    def others_running(self, pgid: int) -> bool:
        """Whether another worker is running (not paused) beside this one now."""
        with self._lock:
            return any(p != pgid and p not in self._paused for p in self._workers)


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
