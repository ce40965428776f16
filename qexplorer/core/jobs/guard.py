"""The memory guard: when to stop a job before the machine runs out of memory.

The runner feeds it one :class:`GuardSample` per sample (real telemetry only -
``--simulate`` changes what is drawn, never what guards a real job) and stops
the job when :meth:`MemoryGuard.check` returns a reason. Four rules (FACTS §1,
§9):

* **level** - host headroom (MemAvailable − reserve) below zero. On unified
  memory (GB10) the GPU draws on this pool, so this is the GPU's headroom too.
* **trend** - the host headroom falls so fast that, at the slope of the last
  ``window_s`` seconds, it would reach zero within ``horizon_s``. On GB10 free
  memory fell from 29 to 2.5 GiB in 9 s during a vLLM load, and MemAvailable
  showed 22.5 GiB "available" when the driver already failed: the level alone
  acts too late. The slope is a least-squares fit, and it must be steeper than
  ``min_slope_bytes_s`` so that allocator noise never stops a job.
* **VRAM** - on a discrete card, a job that holds GPU memory is stopped when the
  card's free memory falls below ``vram_reserve_bytes``.
* **MemFree** - on unified memory only, MemFree below ``memfree_floor_bytes``
  (8 GiB, :data:`~qexplorer.core.telemetry.MEMFREE_FLOOR_BYTES`) *and* still
  falling faster than ``memfree_min_fall_bytes_s`` over the trend window. The
  GB10 wedge comes while MemAvailable is healthy: checkpoint page cache takes the
  free pages the driver needs, so MemFree collapses while MemAvailable (which
  counts that cache as available) stays flat and neither rule above fires. A low
  but steady MemFree is a normal Linux host with a full page cache: the fall is
  what makes it a load eating the last free pages. The slope needs the window's
  points, so in effect the rule acts while memory moves (sampled at 4 Hz), not
  during a timed phase sampled at the user's rate.

Jobs that overlap share one :class:`GuardPool`: one headroom series, and the
job whose footprint grew is the one stopped.

While a job loads, quantizes, converts or starts a server the runner samples at
``FAST_INTERVAL_S`` (4 Hz) so that the trend has points to fit; during timed
phases, where a busy parent would perturb the timing, at the user's rate (each
phase's rate is in :mod:`qexplorer.core.domain.phases`).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, replace

from qexplorer.core.domain.phases import GuardRate, spec_of
from qexplorer.core.telemetry import MEMFREE_FLOOR_BYTES
from qexplorer.core.units import MIB, format_gib

FAST_INTERVAL_S = 0.25  # ≥ 4 Hz while a job loads
TREND_WINDOW_S = 2.0
TREND_HORIZON_S = 3.0
TREND_MIN_POINTS = 4
TREND_MIN_SLOPE_BYTES_S = 512 * MIB  # slower than this is never a plunge
VRAM_RESERVE_BYTES = 512 * MIB
# MemFree moves by tens of MiB/s with allocator and daemon noise; streaming a checkpoint into page cache moves it
# by GiB/s (NVMe). Slower than this is not a load eating the free pages.
MEMFREE_MIN_FALL_BYTES_S = 128 * MIB


@dataclass(frozen=True)
class GuardSample:
    elapsed_s: float
    host_headroom_bytes: int | None  # MemAvailable − reserve
    vram_free_bytes: int | None = None  # discrete card only: the card's free memory
    job_gpu_bytes: int | None = None  # what the job holds on the GPU (None: nothing known)
    mem_free_bytes: int | None = None  # /proc/meminfo MemFree (None: not reported)
    unified: bool = False  # the GPU shares host memory (GB10): the MemFree rule applies


@dataclass(frozen=True)
class GuardStop:
    rule: str  # "level", "trend", "vram" or "memfree"
    reason: str  # one sentence, without the job's name


class MemoryGuard:
    def __init__(self, window_s: float = TREND_WINDOW_S, horizon_s: float = TREND_HORIZON_S,
                 min_slope_bytes_s: float = TREND_MIN_SLOPE_BYTES_S,
                 vram_reserve_bytes: int = VRAM_RESERVE_BYTES,
                 memfree_floor_bytes: int | None = MEMFREE_FLOOR_BYTES,
                 memfree_min_fall_bytes_s: float = MEMFREE_MIN_FALL_BYTES_S) -> None:
        """``memfree_floor_bytes`` None turns the MemFree rule off (the rules as they were before it)."""
        self.window_s = window_s
        self.horizon_s = horizon_s
        self.min_slope_bytes_s = min_slope_bytes_s
        self.vram_reserve_bytes = vram_reserve_bytes
        self.memfree_floor_bytes = memfree_floor_bytes
        self.memfree_min_fall_bytes_s = memfree_min_fall_bytes_s
        self._points: deque[tuple[float, int]] = deque()
        self._free_points: deque[tuple[float, int]] = deque()

    def check(self, sample: GuardSample) -> GuardStop | None:
        headroom = sample.host_headroom_bytes
        if headroom is not None:
            if headroom < 0:
                return GuardStop("level", f"host headroom fell to {format_gib(headroom)} (below the safety reserve)")
            _keep_window(self._points, sample.elapsed_s, headroom, self.window_s)
            slope = self.slope_bytes_s()
            if slope is not None and slope < -self.min_slope_bytes_s:
                seconds_left = headroom / -slope
                if seconds_left < self.horizon_s:
                    return GuardStop("trend", f"host headroom is falling at {format_gib(-slope)}/s and would reach "
                                              f"the safety reserve in {seconds_left:.1f} s "
                                              f"({format_gib(headroom)} above it now)")
        if (sample.vram_free_bytes is not None and sample.job_gpu_bytes
                and sample.vram_free_bytes < self.vram_reserve_bytes):
            return GuardStop("vram", f"the GPU's free memory fell to {format_gib(sample.vram_free_bytes)} "
                                     f"(below {format_gib(self.vram_reserve_bytes)})")
        return self._check_memfree(sample)

    def _check_memfree(self, sample: GuardSample) -> GuardStop | None:
        """Unified memory only: MemFree under the floor and still falling (the page-cache wedge, see above)."""
        free, floor = sample.mem_free_bytes, self.memfree_floor_bytes
        if not sample.unified or free is None or floor is None:
            return None
        _keep_window(self._free_points, sample.elapsed_s, free, self.window_s)
        slope = least_squares_slope(self._free_points, self.window_s)
        if free < floor and slope is not None and slope < -self.memfree_min_fall_bytes_s:
            return GuardStop("memfree", f"MemFree fell to {format_gib(free)}, under the {format_gib(floor)} floor, "
                                        f"and is still falling at {format_gib(-slope)}/s (on unified memory the GPU "
                                        "driver allocates from free pages, and a checkpoint's page cache can use "
                                        "them up while MemAvailable still looks healthy, freezing the machine)")
        return None

    def interval_s(self, phase: str, user_interval_s: float) -> float:
        if spec_of(phase).guard == GuardRate.USER:
            return user_interval_s
        return min(user_interval_s, FAST_INTERVAL_S)

    def slope_bytes_s(self) -> float | None:
        """Least-squares slope of headroom over the window; None with too few points or too short a span."""
        return least_squares_slope(self._points, self.window_s)


def _keep_window(points: deque[tuple[float, int]], now_s: float, value: int, window_s: float) -> None:
    points.append((now_s, value))
    while points and now_s - points[0][0] > window_s:
        points.popleft()


def least_squares_slope(points: deque[tuple[float, int]], window_s: float) -> float | None:
    """Bytes per second over the window; None with too few points or too short a span."""
    if len(points) < TREND_MIN_POINTS or points[-1][0] - points[0][0] < window_s / 4:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var <= 0:
        return None
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var


class GuardPool:
    """One guard over the machine's headroom for every job a runner runs at once (overlapping jobs share one
    pool of memory). Each job's samples feed the same headroom series; when a rule fires, the job stopped is the
    one whose footprint (RSS + GPU) grew most over the trend window - the one causing the plunge - not whichever
    sampled first. Its verdict waits for it if another job's sample tripped the rule. Thread-safe."""

    def __init__(self, guard: MemoryGuard | None = None) -> None:
        self.guard = guard or MemoryGuard()
        self._lock = threading.Lock()
        self._footprints: dict[int, deque[tuple[float, int]]] = {}
        self._pending: dict[int, GuardStop] = {}

    def check(self, job: int, now_s: float, sample: GuardSample, footprint_bytes: int) -> GuardStop | None:
        """``sample.elapsed_s`` is ignored: the pool's clock is ``now_s`` (monotonic, shared by its jobs)."""
        with self._lock:
            series = self._footprints.setdefault(job, deque())
            series.append((now_s, footprint_bytes))
            while len(series) > 1 and now_s - series[0][0] > self.guard.window_s:
                series.popleft()
            if job in self._pending:
                return self._pending.pop(job)
            stop = self.guard.check(replace(sample, elapsed_s=now_s))
            if stop is None:
                return None
            culprit = self._culprit() if stop.rule != "vram" else job
            if culprit == job:
                return stop
            self._pending[culprit] = stop
            return None

    def _culprit(self) -> int:
        def growth(item: tuple[int, deque[tuple[float, int]]]) -> tuple[int, int]:
            series = item[1]
            return series[-1][1] - series[0][1], series[-1][1]

        return max(self._footprints.items(), key=growth)[0]

    def leave(self, job: int) -> None:
        with self._lock:
            self._footprints.pop(job, None)
            self._pending.pop(job, None)
