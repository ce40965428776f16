"""The parent's view of one job's memory: samples from outside the worker, its peaks, and the guard.

Each sample measures the job's process tree (RSS of the worker and of any server it started) and the GPU
memory NVML attributes to it - per process, or, in a container where NVML lists host PIDs, the device's growth
since the job started - and hands the machine's headroom (on unified memory MemFree too) to the runner's
:class:`~.guard.GuardPool`. Guarding
reads **real** telemetry only: ``--simulate`` changes what is drawn, never what guards a real job. The sampling
rate follows the phase (:mod:`qexplorer.core.domain.phases`): 4 Hz while memory moves, the user's rate while a figure is timed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qexplorer.core.domain.phases import PhaseKind, spec_of
from qexplorer.core.jobs.guard import GuardPool, GuardSample, GuardStop
from qexplorer.core.proc import tree_rss
from qexplorer.core.telemetry import TelemetrySampler, TelemetrySnapshot

GPU_BY_PID = "NVML per-process (the job's process tree)"
GPU_BY_DELTA = "NVML device growth since the job started (container: NVML lists host PIDs)"


@dataclass(frozen=True)
class MemorySample:
    elapsed_s: float
    rss_bytes: int
    gpu_bytes: int | None
    headroom_bytes: int | None
    phase: str
    gpu_source: str = ""  # how gpu_bytes was attributed to the job
    mem_free_bytes: int | None = None  # the machine's MemFree (the guard's rule on unified memory)
    vram_free_bytes: int | None = None  # a discrete card's free memory (None: no card, or unified memory)


def attribute_gpu(snapshot: TelemetrySnapshot, tree_pids: set[int], baseline_used: int | None,
                  by_growth: bool = False) -> tuple[int | None, str]:
    """The GPU memory that is the job's: NVML's per-process figures for its process tree; where NVML's PIDs are
    another namespace's (qexplorer in a container), or the job's server is not in its tree (vLLM in a container:
    ``by_growth``), the growth of the devices' used memory since the job started."""
    if not snapshot.devices:
        return None, ""
    matched = [p.gpu_bytes for p in snapshot.processes if p.pid in tree_pids and p.gpu_bytes is not None]
    if not by_growth and (matched or not snapshot.foreign_gpu_pids):
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


def guard_sample(snapshot: TelemetrySnapshot, elapsed_s: float, job_gpu_bytes: int | None) -> GuardSample:
    """What the guard reads from one telemetry sample: the host headroom, a discrete card's free memory, and on
    unified memory MemFree."""
    headroom, free = snapshot.host_headroom_bytes.value, snapshot.host.free_bytes.value
    return GuardSample(elapsed_s, None if headroom is None else int(headroom), discrete_free_bytes(snapshot),
                       job_gpu_bytes, mem_free_bytes=None if free is None else int(free),
                       unified=snapshot.unified)


class MemoryWatch:
    """Samples one job's memory when due, keeps its peaks, and asks the pool whether to stop it."""

    def __init__(self, pid: int, sampler: TelemetrySampler | None, pool: GuardPool, user_interval_s: float,
                 started_s: float, on_memory: Callable[[MemorySample], None] | None = None,
                 by_growth: bool = False) -> None:
        self.pid, self.sampler, self.pool = pid, sampler, pool
        self.by_growth = by_growth  # the job's server runs outside its process tree (a container)
        self.user_interval_s, self.started_s, self.on_memory = user_interval_s, started_s, on_memory
        self.next_sample_s = started_s
        self.samples: list[MemorySample] = []
        self.peak_rss_bytes = 0
        self.peak_gpu_bytes: int | None = None
        self.gpu_source = ""
        self.gpu_unified: bool | None = None  # what the real telemetry said the GPU is
        self._baseline_used: int | None = None

    def due(self, now_s: float) -> bool:
        return now_s >= self.next_sample_s

    def take(self, now_s: float, phase: str) -> tuple[MemorySample, GuardStop | None]:
        self.next_sample_s = now_s + self.pool.guard.interval_s(phase, self.user_interval_s)
        sample, machine = self._measure(now_s - self.started_s, phase)
        self.samples.append(sample)
        if spec_of(phase).in_job_peak:
            self.peak_rss_bytes = max(self.peak_rss_bytes, sample.rss_bytes)
            if sample.gpu_bytes is not None:
                self.peak_gpu_bytes = max(self.peak_gpu_bytes or 0, sample.gpu_bytes)
                self.gpu_source = sample.gpu_source
        if self.on_memory:
            self.on_memory(sample)
        stop = self.pool.check(self.pid, now_s, machine, sample.rss_bytes + (sample.gpu_bytes or 0))
        return sample, stop

    @property
    def server_gpu_bytes(self) -> int | None:
        """How much the job's GPU memory grew while a serving engine ran (its start, benchmark and log-prob
        phases) over what the job held as it began starting (the worker's memory, released after its own passes)
        - the server's own footprint, without the worker's quantizing or quality passes."""
        server = {PhaseKind.ENGINE, PhaseKind.BENCHMARK, PhaseKind.LOG_PROBS}
        during = [s.gpu_bytes for s in self.samples if s.gpu_bytes is not None and spec_of(s.phase).kind in server]
        return max(0, max(during) - during[0]) if during else None

    def _measure(self, elapsed_s: float, phase: str) -> tuple[MemorySample, GuardSample]:
        rss, pids = tree_rss(self.pid)
        if self.sampler is None:
            return MemorySample(elapsed_s, rss, None, None, phase), GuardSample(elapsed_s, None)
        snapshot = self.sampler.sample()
        if self._baseline_used is None:
            self._baseline_used = devices_used_bytes(snapshot)
        self.gpu_unified = snapshot.unified if snapshot.devices else None
        gpu, source = attribute_gpu(snapshot, pids, self._baseline_used, by_growth=self.by_growth)
        machine = guard_sample(snapshot, elapsed_s, gpu)
        return (MemorySample(elapsed_s, rss, gpu, machine.host_headroom_bytes, phase, source, machine.mem_free_bytes,
                             machine.vram_free_bytes), machine)
