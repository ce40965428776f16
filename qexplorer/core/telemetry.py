"""Memory and GPU telemetry that is right on unified memory (NVIDIA GB10).

Two probes feed one sampler:

* an :class:`~qexplorer.core.nvml.NvmlBackend` - NVIDIA's management library
  (``nvidia-ml-py``, :mod:`qexplorer.core.nvml`), or a simulated one from
  :mod:`qexplorer.core.simulate` that raises the same errors;
* a :class:`~qexplorer.core.procfs.HostProbe` - ``psutil`` plus ``/proc/meminfo``
  and ``/proc/pressure/memory`` (:mod:`qexplorer.core.procfs`), or a simulated one.

:meth:`TelemetrySampler.sample` turns one reading of both into a frozen
:class:`TelemetrySnapshot`. The formulas (FACTS §1) live in small pure functions
below so that the simulated profiles and the real machine run the same code:

* unified memory: GPU used = Σ per-process ``usedGpuMemory`` (compute + graphics);
  headroom = MemAvailable − safety reserve; other host =
  (MemTotal − MemAvailable) − GPU used. ``nvmlDeviceGetMemoryInfo`` returns
  NOT_SUPPORTED there, and "MemTotal − MemAvailable" is NOT GPU memory. MemFree
  (``HostMemory.free_bytes``) matters there too: the driver allocates from free
  pages, which checkpoint page cache can take while MemAvailable looks healthy
  (:data:`MEMFREE_FLOOR_BYTES`, the guard's MemFree rule).
* discrete card: total / used / free from ``nvmlDeviceGetMemoryInfo``; a
  NOT_SUPPORTED there (MIG slice, lost GPU) is "unknown", never host numbers.
* no NVML library or no GPU is a normal state: devices is empty, the host
  figures still stand, and ``nvml_status`` says which.

Every figure is a :class:`Reading`: a value plus where it came from.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from qexplorer.core.kinds import NvmlState, ProcessKind
from qexplorer.core.nvml import (
    GpuProcessUsage,
    NvmlBackend,
    NvmlNotSupported,
    NvmlQueryError,
    NvmlUnavailable,
    PynvmlBackend,
)
from qexplorer.core.procfs import HostProbe, LocalHostProbe, PressureStall
from qexplorer.core.units import GIB, format_gib

DEFAULT_RESERVE_BYTES = 8 * GIB
"""A reserve of ~8 GiB ended load failures on GB10 in the field (FACTS §1)."""

MEMFREE_FLOOR_BYTES = 8 * GIB
"""On unified memory, MemFree below this while a job loads is the start of the GB10 wedge: checkpoint page cache
takes the free 2 MiB blocks the driver allocates from, the driver fails with NV_ERR_NO_MEMORY and the host
livelocks, while MemAvailable still shows ~22 GiB (github.com/vllm-project/vllm/issues/56824,
github.com/NVIDIA/open-gpu-kernel-modules/issues/1358). The fix that worked watched MemFree against an 8 GiB floor
from launch to start-up complete (github.com/tonyd2wild/GLM-5.3-Flash-NVFP4-DFlash2-2x-DGX-Spark/pull/19)."""

# Device names that are integrated (share host memory). A NOT_SUPPORTED memory
# query on one of these means unified memory; on anything else it means unknown.
# "GB10" not followed by a digit: a name such as "GB100" is not the Spark's chip.
INTEGRATED_NAME_PATTERN = re.compile(r"GB10(?!\d)|Jetson|Thor|Orin|Xavier|Tegra|nvgpu", re.IGNORECASE)
ADDRESSING_MODE_ATS = 2  # NVML_DEVICE_ADDRESSING_MODE_ATS

TOP_HOST_PROCESSES = 8


# --------------------------------------------------------------------------- snapshot
@dataclass(frozen=True)
class Reading:
    """One figure and where it came from; ``value`` None means unavailable."""

    value: float | int | None
    source: str  # e.g. "nvml", "nvml processes", "/proc/meminfo", "derived"
    note: str = ""

    @property
    def available(self) -> bool:
        return self.value is not None

    @staticmethod
    def missing(note: str) -> Reading:
        return Reading(None, "unavailable", note)

    def text(self, unit: str = "bytes") -> str:
        """The figure with its unit, or why it is missing."""
        if self.value is None:
            return f"unavailable ({self.note})" if self.note else "unavailable"
        if unit == "bytes":
            return format_gib(self.value, precision=2)
        if unit == "%":
            return f"{self.value:.0f} %"
        return f"{self.value:g} {unit}"


@dataclass(frozen=True)
class HostMemory:
    total_bytes: Reading
    available_bytes: Reading
    used_bytes: Reading  # total - available
    free_bytes: Reading
    reclaimable_cache_bytes: Reading  # Cached − Shmem + SReclaimable
    shmem_bytes: Reading  # shared memory (tmpfs, CUDA IPC): counted in Cached, never reclaimable
    mlocked_bytes: Reading  # pinned pages: never reclaimable
    swap_total_bytes: Reading
    swap_free_bytes: Reading
    hugetlb_bytes: Reading
    psi_some_avg10_pct: Reading
    psi_full_avg10_pct: Reading


@dataclass(frozen=True)
class DeviceTelemetry:
    index: int
    name: str
    unified: bool | None  # None: could not tell
    memory_total_bytes: Reading
    gpu_used_bytes: Reading
    headroom_bytes: Reading
    optimistic_headroom_bytes: Reading  # unified only: MemAvailable + SwapFree - HugeTLB
    other_host_bytes: Reading  # unified only
    utilization_pct: Reading
    temperature_c: Reading
    power_w: Reading
    sm_clock_mhz: Reading
    compute_capability: tuple[int, int] | None
    memory_note: str = ""


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    name: str
    gpu_bytes: int | None  # None: not on a GPU, or the driver did not say
    rss_bytes: int | None
    own_job: bool

    @property
    def sort_bytes(self) -> int:
        return max(self.gpu_bytes or 0, self.rss_bytes or 0)


@dataclass(frozen=True)
class TelemetrySnapshot:
    timestamp_s: float
    simulated: str | None  # profile name, or None on real hardware
    nvml_status: str  # "ok", or the sentence that says why there is no GPU telemetry
    reserve_bytes: int
    host: HostMemory
    host_headroom_bytes: Reading  # MemAvailable - reserve
    devices: tuple[DeviceTelemetry, ...]
    processes: tuple[ProcessInfo, ...]
    nvml_state: NvmlState = NvmlState.OK  # the machine-readable half of nvml_status
    # NVML's per-process PIDs are not this PID namespace's (a container): matching a job by PID finds nothing
    foreign_gpu_pids: bool = False

    @property
    def unified(self) -> bool:
        return any(device.unified for device in self.devices)

    @property
    def has_gpu(self) -> bool:
        return bool(self.devices)

    def headroom_for(self, on_gpu: bool) -> Reading:
        """The headroom a model loaded on the GPU (or on the CPU) must fit in.

        Unified memory: GPU and CPU draw on the same pool, so both are the host
        headroom. Discrete: the card's own free memory.
        """
        if on_gpu and self.devices and not self.devices[0].unified:
            return self.devices[0].headroom_bytes
        return self.host_headroom_bytes

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: bytes are integers, each figure keeps its source."""
        data = asdict(self)
        data["unified"] = self.unified
        data["schema"] = "qexplorer.telemetry/1"
        return data


# --------------------------------------------------------------------------- formulas
def merge_by_pid(processes: Iterable[GpuProcessUsage]) -> list[GpuProcessUsage]:
    """One entry per process: NVML lists a process with both a compute and a graphics context in both lists,
    each with the same ``usedGpuMemory`` (a desktop GB10, GL interop); summing them counts it twice. nvidia-smi,
    nvitop and gpustat show it once, as "C+G"."""
    merged: dict[int, GpuProcessUsage] = {}
    for proc in processes:
        seen = merged.get(proc.pid)
        if seen is None:
            merged[proc.pid] = proc
            continue
        used = max((v for v in (seen.used_bytes, proc.used_bytes) if v is not None), default=None)
        kind = seen.kind if seen.kind == proc.kind else ProcessKind.COMPUTE_GRAPHICS
        merged[proc.pid] = GpuProcessUsage(proc.pid, used, kind)
    return list(merged.values())


def unified_gpu_used_bytes(processes: Iterable[GpuProcessUsage]) -> int:
    """GPU memory on unified memory: the sum of per-process allocations."""
    return sum(p.used_bytes or 0 for p in processes)


def headroom_bytes(mem_available_bytes: int, reserve_bytes: int) -> int:
    """What can still be allocated without eating the safety reserve."""
    return mem_available_bytes - reserve_bytes


def optimistic_headroom_bytes(mem_available: int, swap_free: int, hugetlb: int) -> int:
    """NVIDIA's guidance for UMA (llama.cpp PR #17368): available + swap − HugeTLB."""
    return mem_available + swap_free - hugetlb


def other_host_bytes(mem_total: int, mem_available: int, gpu_used: int) -> int:
    """Host memory in use by everything that is not a GPU allocation."""
    return (mem_total - mem_available) - gpu_used


def is_unified(name: str, memory_query_supported: bool, addressing_mode: int | None) -> bool | None:
    """FACTS §1, §9: unified if a known integrated name (GB10, Jetson "... (nvgpu)", Thor), or if the device
    memory query fails on a GPU with ATS addressing.

    The name wins over the memory query: an LD_PRELOAD shim (nvml-unified-shim) makes
    ``nvmlDeviceGetMemoryInfo`` answer on GB10 with total = MemTotal, and that answer must not turn the
    shared pool into a "discrete card" whose free memory is trusted.

    ATS alone is not unified memory: GH200 and GB200 address host memory through ATS but have their own HBM,
    and their memory query answers (reviews/gpu-audit.md P2-10 (b)). Treating them as one pool would make host
    MemAvailable their GPU headroom and switch the VRAM rule off.
    """
    if INTEGRATED_NAME_PATTERN.search(name):
        return True
    if memory_query_supported:
        return False
    if addressing_mode == ADDRESSING_MODE_ATS:
        return True  # ATS and no device memory of its own to report: the host's pool
    return None  # a discrete card that does not answer: unknown


def unified_memory_here(nvml: NvmlBackend | None = None) -> bool:
    """Whether this machine's GPU shares host memory (GB10), by the rule of :func:`is_unified`; False without
    NVML or a GPU. For a worker that must decide before it loads, without a whole telemetry sample."""
    backend = nvml if nvml is not None else PynvmlBackend()
    try:
        backend.init()
    except NvmlUnavailable:
        return False
    try:
        for index in range(backend.device_count()):
            try:
                name = backend.name(index)
            except (NvmlNotSupported, NvmlQueryError):
                name = ""
            try:
                backend.memory_info(index)
                supported = True
            except (NvmlNotSupported, NvmlQueryError):
                supported = False
            try:
                mode: int | None = backend.addressing_mode(index)
            except (NvmlNotSupported, NvmlQueryError):
                mode = None
            if is_unified(name, supported, mode):
                return True
        return False
    finally:
        backend.shutdown()


# --------------------------------------------------------------------------- sampler
@dataclass
class TelemetrySampler:
    """Reads both probes and applies the formulas; one call = one snapshot (thread-safe)."""

    nvml: NvmlBackend
    host: HostProbe
    reserve_bytes: int = DEFAULT_RESERVE_BYTES
    simulated: str | None = None
    clock: Callable[[], float] = time.time
    own_pids: frozenset[int] = field(default_factory=frozenset)
    _nvml_status: str | None = field(default=None, init=False)
    _nvml_state: NvmlState = field(default=NvmlState.OK, init=False)
    # The UI's sampling thread and a job's guard share one sampler.
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def _ensure_nvml(self) -> str:
        if self._nvml_status is None:
            try:
                self.nvml.init()
                count = self.nvml.device_count()
                self._nvml_status = "ok" if count else "no NVIDIA GPU found"
                self._nvml_state = NvmlState.OK if count else NvmlState.NO_GPU
            except NvmlUnavailable as exc:
                self._nvml_status = str(exc)
                self._nvml_state = NvmlState.NO_DRIVER
        return self._nvml_status

    def close(self) -> None:
        if self._nvml_status == "ok":
            self.nvml.shutdown()
        self._nvml_status = None

    def sample(self) -> TelemetrySnapshot:
        with self._lock:
            return self._sample()

    def _sample(self) -> TelemetrySnapshot:
        status = self._ensure_nvml()
        state = self._nvml_state
        meminfo = self.host.meminfo()
        host = _host_memory(meminfo, self.host.pressure())
        mem_available = meminfo.get("MemAvailable")
        host_headroom = (
            Reading(headroom_bytes(mem_available, self.reserve_bytes), "derived",
                    "MemAvailable − reserve")
            if mem_available is not None
            else Reading.missing("MemAvailable unknown")
        )
        devices: list[DeviceTelemetry] = []
        gpu_usage: dict[int, int | None] = {}
        if status == "ok":
            try:
                count = self.nvml.device_count()
                for index in range(count):
                    device, usage = self._device(index, meminfo)
                    devices.append(device)
                    for proc in usage:
                        previous = gpu_usage.get(proc.pid) or 0
                        gpu_usage[proc.pid] = previous + (proc.used_bytes or 0)
            except NvmlUnavailable as exc:  # the GPU went away mid-run
                status = f"telemetry lost: {exc}"
                state = NvmlState.LOST
                devices = []
        processes = self._processes(gpu_usage)
        visible = {p.pid for p in processes if p.rss_bytes is not None}
        foreign = bool(gpu_usage) and (self.host.in_container() or not visible & set(gpu_usage))
        return TelemetrySnapshot(
            timestamp_s=self.clock(),
            simulated=self.simulated,
            nvml_status=status,
            reserve_bytes=self.reserve_bytes,
            host=host,
            host_headroom_bytes=host_headroom,
            devices=tuple(devices),
            processes=processes,
            nvml_state=state,
            foreign_gpu_pids=foreign,
        )

    def _query(self, fn: Callable[[int], Any], index: int, source: str = "nvml") -> Reading:
        try:
            return Reading(fn(index), source)
        except NvmlNotSupported:
            return Reading.missing("not supported by this device")
        except NvmlQueryError as exc:
            return Reading.missing(str(exc))

    def _device(
        self, index: int, meminfo: dict[str, int]
    ) -> tuple[DeviceTelemetry, list[GpuProcessUsage]]:
        try:
            name = self.nvml.name(index)
        except (NvmlNotSupported, NvmlQueryError) as exc:
            name = f"GPU {index} ({exc})"
        try:
            usage = merge_by_pid(self.nvml.processes(index))
            usage_ok = True
        except (NvmlNotSupported, NvmlQueryError):
            usage, usage_ok = [], False
        try:
            total, used, free = self.nvml.memory_info(index)
            memory_supported = True
        except NvmlNotSupported:
            memory_supported = False
        except NvmlQueryError as exc:
            raise NvmlUnavailable(str(exc)) from exc
        try:
            mode: int | None = self.nvml.addressing_mode(index)
        except (NvmlNotSupported, NvmlQueryError):
            mode = None
        try:
            capability: tuple[int, int] | None = self.nvml.compute_capability(index)
        except (NvmlNotSupported, NvmlQueryError):
            capability = None
        unified = is_unified(name, memory_supported, mode)

        missing_unified = Reading.missing("unified memory only")
        optimistic = other = missing_unified
        note = ""
        if unified:
            mem_total = meminfo.get("MemTotal")
            mem_available = meminfo.get("MemAvailable")
            gpu_used = (
                Reading(unified_gpu_used_bytes(usage), "nvml processes", "Σ per-process usedGpuMemory")
                if usage_ok
                else Reading.missing("per-process query failed")
            )
            total_r = Reading(mem_total, "/proc/meminfo", "shared pool: MemTotal")
            if mem_available is not None and mem_total is not None:
                headroom = Reading(headroom_bytes(mem_available, self.reserve_bytes), "derived",
                                   "MemAvailable − reserve")
                optimistic = Reading(
                    optimistic_headroom_bytes(
                        mem_available, meminfo.get("SwapFree", 0), meminfo.get("Hugetlb", 0)
                    ),
                    "derived",
                    "MemAvailable + SwapFree − HugeTLB",
                )
                if gpu_used.value is not None:
                    other = Reading(other_host_bytes(mem_total, mem_available, int(gpu_used.value)),
                                    "derived", "(MemTotal − MemAvailable) − GPU used")
            else:
                headroom = Reading.missing("MemAvailable unknown")
            note = "unified memory: GPU used is the sum of process allocations"
            if memory_supported:  # a shim answers the memory query; its "free" is not the pool's headroom
                note += f" (nvmlDeviceGetMemoryInfo answered total {format_gib(total)}: a shim, not used)"
        elif memory_supported:
            total_r = Reading(total, "nvml")
            gpu_used = Reading(used, "nvml")
            headroom = Reading(free, "nvml", "free device memory")
        else:
            total_r = gpu_used = headroom = Reading.missing("memory query NOT_SUPPORTED on a discrete card")
            note = "memory unknown: NOT_SUPPORTED on a discrete card (MIG slice or lost GPU?)"

        device = DeviceTelemetry(
            index=index,
            name=name,
            unified=unified,
            memory_total_bytes=total_r,
            gpu_used_bytes=gpu_used,
            headroom_bytes=headroom,
            optimistic_headroom_bytes=optimistic,
            other_host_bytes=other,
            utilization_pct=self._query(self.nvml.utilization_pct, index),
            temperature_c=self._query(self.nvml.temperature_c, index),
            power_w=self._query(self.nvml.power_w, index),
            sm_clock_mhz=self._query(self.nvml.sm_clock_mhz, index),
            compute_capability=capability,
            memory_note=note,
        )
        return device, usage

    def _processes(self, gpu_usage: dict[int, int | None]) -> tuple[ProcessInfo, ...]:
        rows: dict[int, ProcessInfo] = {}
        wanted = set(gpu_usage) | set(self.own_pids)
        for pid in wanted:
            found = self.host.process(pid)
            name, rss = found if found else ("?", None)
            rows[pid] = ProcessInfo(pid, name, gpu_usage.get(pid), rss, pid in self.own_pids)
        for pid, name, rss in self.host.top_processes(TOP_HOST_PROCESSES):
            if pid not in rows:
                rows[pid] = ProcessInfo(pid, name, None, rss, pid in self.own_pids)
        return tuple(sorted(rows.values(), key=lambda p: (-p.sort_bytes, p.pid)))


def _host_memory(meminfo: dict[str, int], psi: PressureStall | None) -> HostMemory:
    def pick(key: str, source: str) -> Reading:
        value = meminfo.get(key)
        return Reading(value, source) if value is not None else Reading.missing(f"{key} not reported")

    total = meminfo.get("MemTotal")
    available = meminfo.get("MemAvailable")
    used = (
        Reading(total - available, "derived", "MemTotal − MemAvailable")
        if total is not None and available is not None
        else Reading.missing("MemTotal or MemAvailable unknown")
    )
    if "Cached" in meminfo:
        # Shmem sits in Cached but cannot be dropped; GB10 users have seen tens of GiB of it (FACTS §9)
        cache = Reading(max(0, meminfo["Cached"] - meminfo.get("Shmem", 0)) + meminfo.get("SReclaimable", 0),
                        "/proc/meminfo", "Cached − Shmem + SReclaimable")
    else:
        cache = Reading.missing("no /proc/meminfo")
    if psi is None:
        some = full = Reading.missing("no /proc/pressure/memory (PSI off)")
    else:
        some = Reading(psi.some_avg10, "/proc/pressure/memory")
        full = Reading(psi.full_avg10, "/proc/pressure/memory")
    return HostMemory(
        total_bytes=pick("MemTotal", "psutil"),
        available_bytes=pick("MemAvailable", "psutil"),
        used_bytes=used,
        free_bytes=pick("MemFree", "/proc/meminfo"),
        reclaimable_cache_bytes=cache,
        shmem_bytes=pick("Shmem", "/proc/meminfo"),
        mlocked_bytes=pick("Mlocked", "/proc/meminfo"),
        swap_total_bytes=pick("SwapTotal", "psutil"),
        swap_free_bytes=pick("SwapFree", "psutil"),
        hugetlb_bytes=pick("Hugetlb", "/proc/meminfo"),
        psi_some_avg10_pct=some,
        psi_full_avg10_pct=full,
    )


def local_sampler(reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> TelemetrySampler:
    """The sampler for this machine's real hardware."""
    return TelemetrySampler(PynvmlBackend(), LocalHostProbe(), reserve_bytes=reserve_bytes)
