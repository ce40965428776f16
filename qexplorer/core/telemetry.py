"""Memory and GPU telemetry that is right on unified memory (NVIDIA GB10).

Two probes feed one sampler:

* an :class:`NvmlBackend` - NVIDIA's management library (``nvidia-ml-py``), or a
  simulated one from :mod:`qexplorer.core.simulate` that raises the same errors;
* a :class:`HostProbe` - ``psutil`` plus ``/proc/meminfo`` and
  ``/proc/pressure/memory``, or a simulated one.

:meth:`TelemetrySampler.sample` turns one reading of both into a frozen
:class:`TelemetrySnapshot`. The formulas (FACTS §1) live in small pure functions
below so that the simulated profiles and the real machine run the same code:

* unified memory: GPU used = Σ per-process ``usedGpuMemory`` (compute + graphics);
  headroom = MemAvailable − safety reserve; other host =
  (MemTotal − MemAvailable) − GPU used. ``nvmlDeviceGetMemoryInfo`` returns
  NOT_SUPPORTED there, and "MemTotal − MemAvailable" is NOT GPU memory.
* discrete card: total / used / free from ``nvmlDeviceGetMemoryInfo``; a
  NOT_SUPPORTED there (MIG slice, lost GPU) is "unknown", never host numbers.
* no NVML library or no GPU is a normal state: devices is empty, the host
  figures still stand, and ``nvml_status`` says which.

Every figure is a :class:`Reading`: a value plus where it came from.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from qexplorer.core.kinds import NvmlState, ProcessKind
from qexplorer.core.units import GIB, format_gib

DEFAULT_RESERVE_BYTES = 8 * GIB
"""A reserve of ~8 GiB ended load failures on GB10 in the field (FACTS §1)."""

# Device names that are integrated (share host memory). A NOT_SUPPORTED memory
# query on one of these means unified memory; on anything else it means unknown.
INTEGRATED_NAME_PATTERN = re.compile(r"GB10|Jetson|Thor|Orin|Xavier|Tegra|nvgpu", re.IGNORECASE)
ADDRESSING_MODE_ATS = 2  # NVML_DEVICE_ADDRESSING_MODE_ATS

TOP_HOST_PROCESSES = 8


# --------------------------------------------------------------------------- errors
class NvmlUnavailable(Exception):
    """NVML cannot be used at all: no library, no driver, or no GPU."""


class NvmlNotSupported(Exception):
    """A query that this device does not answer (NVML_ERROR_NOT_SUPPORTED)."""


class NvmlQueryError(Exception):
    """Any other NVML failure for one query (GPU lost, permission, ...)."""


# --------------------------------------------------------------------------- probes
@dataclass(frozen=True)
class GpuProcessUsage:
    pid: int
    used_bytes: int | None  # None: the driver did not say
    kind: ProcessKind


class NvmlBackend(Protocol):
    """The handful of NVML queries qexplorer uses; real or simulated.

    Every query method raises :class:`NvmlNotSupported` or
    :class:`NvmlQueryError`; ``init`` raises :class:`NvmlUnavailable`.
    """

    def init(self) -> None: ...
    def shutdown(self) -> None: ...
    def device_count(self) -> int: ...
    def name(self, index: int) -> str: ...
    def memory_info(self, index: int) -> tuple[int, int, int]: ...  # total, used, free
    def processes(self, index: int) -> list[GpuProcessUsage]: ...
    def utilization_pct(self, index: int) -> int: ...
    def temperature_c(self, index: int) -> int: ...
    def power_w(self, index: int) -> float: ...
    def sm_clock_mhz(self, index: int) -> int: ...
    def compute_capability(self, index: int) -> tuple[int, int]: ...
    def addressing_mode(self, index: int) -> int: ...


@dataclass(frozen=True)
class PressureStall:
    """``/proc/pressure/memory``: % of wall time tasks were stalled on memory."""

    some_avg10: float
    full_avg10: float


class HostProbe(Protocol):
    """Host memory and processes; real (psutil + /proc) or simulated."""

    def meminfo(self) -> dict[str, int]:
        """Bytes for MemTotal, MemAvailable, MemFree, Cached, SReclaimable, Shmem,
        Mlocked, SwapTotal, SwapFree, Hugetlb - whichever the platform has."""
        ...

    def pressure(self) -> PressureStall | None: ...
    def process(self, pid: int) -> tuple[str, int] | None: ...  # name, rss bytes
    def top_processes(self, count: int) -> list[tuple[int, str, int]]: ...  # pid, name, rss
    def in_container(self) -> bool: ...  # NVML then reports host PIDs that this namespace cannot see


class PynvmlBackend:
    """:class:`NvmlBackend` over ``nvidia-ml-py`` (imported lazily)."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []

    def init(self) -> None:
        try:
            import pynvml
        except ImportError as exc:  # nvidia-ml-py not installed
            raise NvmlUnavailable("nvidia-ml-py is not installed") from exc
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(_nvml_unavailable_reason(exc)) from exc
        self._nvml = pynvml

    def shutdown(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self._nvml = None

    def _call(self, fn_name: str, index: int, *args: Any) -> Any:
        nvml = self._nvml
        if nvml is None:
            raise NvmlQueryError("NVML is not initialised")
        try:
            return getattr(nvml, fn_name)(self._handles[index], *args)
        except nvml.NVMLError as exc:
            if exc.value == nvml.NVML_ERROR_NOT_SUPPORTED:
                raise NvmlNotSupported(fn_name) from exc
            raise NvmlQueryError(str(exc)) from exc
        except AttributeError as exc:  # an older library without this function
            raise NvmlNotSupported(fn_name) from exc

    def device_count(self) -> int:
        return len(self._handles)

    def name(self, index: int) -> str:
        name = self._call("nvmlDeviceGetName", index)
        return name.decode() if isinstance(name, bytes) else str(name)

    def memory_info(self, index: int) -> tuple[int, int, int]:
        """total, used, free - ``used`` as nvidia-smi reports it: without the driver's reserved memory.

        The v1 query counts the driver's reservation as used (480 MiB on an idle H100 80GB HBM3 where
        nvidia-smi said 0 MiB, seen with scripts/gpu_check.py); the v2 query reports it apart."""
        version = getattr(self._nvml, "nvmlMemory_v2", None)
        if version is not None:
            try:
                info = self._call("nvmlDeviceGetMemoryInfo", index, version)
                return int(info.total), int(info.used), int(info.free)
            except NvmlQueryError:
                pass  # a driver without the v2 query: the v1 figures below
        info = self._call("nvmlDeviceGetMemoryInfo", index)
        return int(info.total), int(info.used), int(info.free)

    def processes(self, index: int) -> list[GpuProcessUsage]:
        found: list[GpuProcessUsage] = []
        for fn_name, kind in (
            ("nvmlDeviceGetComputeRunningProcesses", ProcessKind.COMPUTE),
            ("nvmlDeviceGetGraphicsRunningProcesses", ProcessKind.GRAPHICS),
        ):
            try:
                rows = self._call(fn_name, index)
            except NvmlNotSupported:
                continue
            for row in rows:
                used = row.usedGpuMemory
                found.append(GpuProcessUsage(int(row.pid), None if used is None else int(used), kind))
        return found

    def utilization_pct(self, index: int) -> int:
        return int(self._call("nvmlDeviceGetUtilizationRates", index).gpu)

    def temperature_c(self, index: int) -> int:
        return int(self._call("nvmlDeviceGetTemperature", index, 0))  # NVML_TEMPERATURE_GPU

    def power_w(self, index: int) -> float:
        return self._call("nvmlDeviceGetPowerUsage", index) / 1000.0  # mW

    def sm_clock_mhz(self, index: int) -> int:
        return int(self._call("nvmlDeviceGetClockInfo", index, 1))  # NVML_CLOCK_SM

    def compute_capability(self, index: int) -> tuple[int, int]:
        major, minor = self._call("nvmlDeviceGetCudaComputeCapability", index)
        return int(major), int(minor)

    def addressing_mode(self, index: int) -> int:
        return int(self._call("nvmlDeviceGetAddressingMode", index))


def _nvml_unavailable_reason(exc: Exception) -> str:
    text = str(exc)
    if "Library Not Found" in text or "LibraryNotFound" in type(exc).__name__:
        return "no NVIDIA driver library (libnvidia-ml) on this machine"
    if "Driver Not Loaded" in text:
        return "the NVIDIA driver is not loaded"
    return f"NVML failed to start: {text}"


_MEMINFO_KEYS = ("Cached", "SReclaimable", "Hugetlb", "MemFree", "Shmem", "Mlocked")


class LocalHostProbe:
    """:class:`HostProbe` for this machine: psutil, plus /proc where Linux has it."""

    def __init__(self, proc_root: str = "/proc") -> None:
        self._proc_root = proc_root
        self._last_top: list[tuple[int, str, int]] = []
        self._last_top_at = 0.0
        self._in_container: bool | None = None

    def meminfo(self) -> dict[str, int]:
        import psutil

        vm = psutil.virtual_memory()
        swap = psutil.swap_memory()
        values = {
            "MemTotal": int(vm.total),
            "MemAvailable": int(vm.available),
            "SwapTotal": int(swap.total),
            "SwapFree": int(swap.free),
        }
        values.update(read_meminfo(os.path.join(self._proc_root, "meminfo"), _MEMINFO_KEYS))
        return values

    def pressure(self) -> PressureStall | None:
        return read_pressure(os.path.join(self._proc_root, "pressure", "memory"))

    def process(self, pid: int) -> tuple[str, int] | None:
        import psutil

        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                return proc.name(), int(proc.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None

    def in_container(self) -> bool:
        """A container (docker, podman) or a nested PID namespace: NVML's PIDs are not ours (FACTS §9).
        It does not change while the process runs: looked up once, not at every sample."""
        if self._in_container is None:
            marked = bool(os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")
                          or os.environ.get("container"))
            status = read_proc_fields(os.path.join(self._proc_root, "self", "status"), ("NSpid",))
            self._in_container = marked or len(status.get("NSpid", "").split()) > 1
        return self._in_container

    def top_processes(self, count: int) -> list[tuple[int, str, int]]:
        # Walking every process costs a few ms; the table does not need it at
        # the sampling rate, so it is refreshed at most every 5 s.
        now = time.monotonic()
        if self._last_top and now - self._last_top_at < 5.0:
            return self._last_top
        import psutil

        rows = []
        for proc in psutil.process_iter(["pid", "name", "memory_info"]):
            info = proc.info
            mem = info.get("memory_info")
            if mem is not None:
                rows.append((int(info["pid"]), str(info.get("name") or "?"), int(mem.rss)))
        rows.sort(key=lambda row: row[2], reverse=True)
        self._last_top = rows[:count]
        self._last_top_at = now
        return self._last_top


def read_proc_fields(path: str, keys: Iterable[str]) -> dict[str, str]:
    """The text after ``key:`` for each named field of a ``/proc`` key-value file (absent file or key: absent)."""
    wanted = set(keys)
    found: dict[str, str] = {}
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in wanted:
                    found[key] = rest.strip()
    except OSError:
        return {}
    return found


def read_meminfo(path: str, keys: Iterable[str]) -> dict[str, int]:
    """The named ``/proc/meminfo`` (or ``/proc/self/status``) fields in bytes (absent file or key: absent)."""
    found: dict[str, int] = {}
    try:
        for key, text in read_proc_fields(path, keys).items():
            parts = text.split()
            if parts:
                scale = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
                found[key] = int(parts[0]) * scale
    except ValueError:
        return {}
    return found


def read_pressure(path: str) -> PressureStall | None:
    """Parse ``/proc/pressure/memory``; None where the kernel has no PSI."""
    try:
        with open(path, encoding="ascii") as handle:
            text = handle.read()
    except OSError:
        return None
    return parse_pressure(text)


def parse_pressure(text: str) -> PressureStall | None:
    values: dict[str, float] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        for field_text in rest.split():
            name, _, number = field_text.partition("=")
            if name == "avg10":
                try:
                    values[kind] = float(number)
                except ValueError:
                    return None
    if "some" not in values:
        return None
    return PressureStall(some_avg10=values["some"], full_avg10=values.get("full", 0.0))


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
    """FACTS §1, §9: unified if ATS addressing or a known integrated name (GB10, Jetson "... (nvgpu)", Thor).

    The name wins over the memory query: an LD_PRELOAD shim (nvml-unified-shim) makes
    ``nvmlDeviceGetMemoryInfo`` answer on GB10 with total = MemTotal, and that answer must not turn the
    shared pool into a "discrete card" whose free memory is trusted.
    """
    if addressing_mode == ADDRESSING_MODE_ATS or INTEGRATED_NAME_PATTERN.search(name):
        return True
    if memory_query_supported:
        return False
    return None  # a discrete card that does not answer: unknown


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
