"""Which memory figures to draw, and as what - decided here, drawn by the UI.

A :class:`MemoryBreakdown` is one bar: a pool (the unified pool, a discrete
card's memory, or host RAM) split into segments that add up to its total. The UI
only scales segments to cells; it never derives a figure.
"""

from __future__ import annotations

from dataclasses import dataclass

from qexplorer.core.telemetry import MEMFREE_FLOOR_BYTES, DeviceTelemetry, Reading, TelemetrySnapshot


@dataclass(frozen=True)
class MemorySegment:
    label: str
    bytes: int
    role: str  # "gpu", "host", "free" - the UI maps roles to theme colours
    source: str


@dataclass(frozen=True)
class MemoryBreakdown:
    title: str
    total_bytes: int | None
    segments: tuple[MemorySegment, ...]
    reserve_bytes: int  # drawn at the end of the free segment; 0 for no reserve
    headroom: Reading
    note: str = ""
    # unified memory: MemFree, shown beside MemAvailable - page cache can take it while MemAvailable looks
    # healthy, and the GPU driver needs it (the guard's MemFree rule); low = under the guard's floor
    mem_free: Reading | None = None
    mem_free_low: bool = False


def _value(reading: Reading) -> int | None:
    return None if reading.value is None else int(reading.value)


def host_breakdown(snapshot: TelemetrySnapshot, title: str = "Host RAM") -> MemoryBreakdown:
    host = snapshot.host
    total, used, available = _value(host.total_bytes), _value(host.used_bytes), _value(host.available_bytes)
    segments: list[MemorySegment] = []
    if used is not None and available is not None:
        segments = [
            MemorySegment("used", used, "host", "MemTotal − MemAvailable"),
            MemorySegment("available", available, "free", host.available_bytes.source),
        ]
    return MemoryBreakdown(title, total, tuple(segments), snapshot.reserve_bytes, snapshot.host_headroom_bytes)


def unified_breakdown(snapshot: TelemetrySnapshot, device: DeviceTelemetry) -> MemoryBreakdown:
    total = _value(device.memory_total_bytes)
    gpu, other = _value(device.gpu_used_bytes), _value(device.other_host_bytes)
    available = _value(snapshot.host.available_bytes)
    segments: list[MemorySegment] = []
    if gpu is not None and other is not None and available is not None:
        segments = [
            MemorySegment("GPU", gpu, "gpu", "Σ process allocations (NVML)"),
            MemorySegment("other host", max(0, other), "host", "(MemTotal − MemAvailable) − GPU"),
            MemorySegment("avail", available, "free", "MemAvailable"),
        ]
    free = snapshot.host.free_bytes
    return MemoryBreakdown(
        f"Unified pool · {device.name}", total, tuple(segments), snapshot.reserve_bytes,
        device.headroom_bytes, device.memory_note, mem_free=free,
        mem_free_low=free.value is not None and free.value < MEMFREE_FLOOR_BYTES,
    )


def device_breakdown(device: DeviceTelemetry) -> MemoryBreakdown:
    total, used, free = (_value(device.memory_total_bytes), _value(device.gpu_used_bytes),
                         _value(device.headroom_bytes))
    segments: tuple[MemorySegment, ...] = ()
    if total is not None and used is not None and free is not None:
        segments = (
            MemorySegment("GPU used", used, "gpu", "nvmlDeviceGetMemoryInfo"),
            MemorySegment("free", free, "free", "nvmlDeviceGetMemoryInfo"),
        )
    return MemoryBreakdown(f"VRAM · {device.name}", total, segments, 0, device.headroom_bytes, device.memory_note)


def breakdowns(snapshot: TelemetrySnapshot) -> tuple[MemoryBreakdown, ...]:
    """The bars for a snapshot: the unified pool, or each card plus host RAM."""
    bars: list[MemoryBreakdown] = []
    unified = False
    for device in snapshot.devices:
        if device.unified:
            unified = True
            bars.append(unified_breakdown(snapshot, device))
        else:
            bars.append(device_breakdown(device))
    if not unified:
        bars.append(host_breakdown(snapshot))
    return tuple(bars)
