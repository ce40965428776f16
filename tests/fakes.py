"""Small NVML fakes for formula tests (the profiles live in qexplorer.core.simulate)."""

from __future__ import annotations

from qexplorer.core.simulate import SimulatedDevice, SimulatedHost, SimulatedMachine, SimulatedNvml, SimulatedProcess
from qexplorer.core.telemetry import TelemetrySampler
from qexplorer.core.units import GIB


def machine(devices: list[SimulatedDevice], processes: list[SimulatedProcess], *, missing: str | None = None,
            total: int = 100 * GIB, other: int = 10 * GIB) -> SimulatedMachine:
    return SimulatedMachine(
        name="test", mem_total_bytes=total, other_host_bytes=other, cached_bytes=5 * GIB,
        sreclaimable_bytes=1 * GIB, swap_total_bytes=2 * GIB, devices=devices, processes=processes,
        nvml_missing_reason=missing,
    )


def sampler(m: SimulatedMachine, reserve: int = 8 * GIB) -> TelemetrySampler:
    return TelemetrySampler(SimulatedNvml(m), SimulatedHost(m), reserve_bytes=reserve, simulated="test",
                            clock=lambda: 0.0)
