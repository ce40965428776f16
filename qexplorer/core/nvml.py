"""NVIDIA's management library behind one small protocol: :class:`NvmlBackend` (the queries the sampler makes),
:class:`PynvmlBackend` over ``nvidia-ml-py`` (imported lazily: no GPU is a normal state), and the three errors
every backend raises - the library is absent, the query is NOT_SUPPORTED (GB10's memory query), or it failed.
:mod:`qexplorer.core.simulate` answers the same protocol with the same errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from qexplorer.core.kinds import ProcessKind


class NvmlUnavailable(Exception):
    """NVML cannot be used at all: no library, no driver, or no GPU."""


class NvmlNotSupported(Exception):
    """A query that this device does not answer (NVML_ERROR_NOT_SUPPORTED)."""


class NvmlQueryError(Exception):
    """Any other NVML failure for one query (GPU lost, permission, ...)."""


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
