"""Simulated hardware: a fake NVML and a fake host that the real formulas read.

``--simulate PROFILE`` (``PROFILES``) is a documented demo mode and the seam the
tests use. It changes only what is drawn: real jobs are planned and guarded on
the real machine (:class:`~qexplorer.ui.sources.Sources` keeps the two apart);
tests hand a simulated sampler to a runner to drive its guard. Nothing here computes a figure the user sees: the fakes answer the same
queries as NVML and psutil (raising the same NOT_SUPPORTED errors), and
:class:`~qexplorer.core.telemetry.TelemetrySampler` applies the formulas.

Figures move a little from sample to sample (a deterministic function of the
sample number, never of wall time), so the history plots have something to show
and tests stay reproducible.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from qexplorer.core.nvml import GpuProcessUsage, NvmlNotSupported, NvmlQueryError, NvmlUnavailable
from qexplorer.core.procfs import LocalHostProbe, PressureStall
from qexplorer.core.telemetry import ADDRESSING_MODE_ATS, DEFAULT_RESERVE_BYTES, TelemetrySampler, local_sampler
from qexplorer.core.units import GIB, MIB

PROFILES = ("none", "h100", "gb10", "gb10-plunge", "gb10-pagecache", "gb10-container", "gb10-shim", "jetson",
            "thor", "gh200")
SIMULATED_EPOCH_S = 1_767_268_800.0  # 2026-01-01 12:00:00 UTC: a frozen clock


@dataclass
class SimulatedProcess:
    pid: int
    name: str
    rss_bytes: int
    gpu_bytes: int = 0  # 0: not a GPU process
    gpu_kind: str = "compute"
    wobble_bytes: int = 0  # amplitude of the deterministic variation


@dataclass
class SimulatedDevice:
    name: str
    compute_capability: tuple[int, int]
    memory_total_bytes: int | None  # None: the memory query is NOT_SUPPORTED
    driver_reserved_bytes: int = 0
    addressing_mode: int | None = None  # None: NOT_SUPPORTED
    # an LD_PRELOAD shim (nvml-unified-shim) answers the memory query on an integrated GPU: total = MemTotal
    shim: bool = False
    utilization_pct: int = 0
    temperature_c: int = 40
    power_w: float = 50.0
    sm_clock_mhz: int = 1500


@dataclass
class SimulatedMachine:
    """One profile's state. ``tick`` advances the deterministic variation."""

    name: str
    mem_total_bytes: int
    other_host_bytes: int  # non-GPU host memory in use
    cached_bytes: int
    sreclaimable_bytes: int
    swap_total_bytes: int
    devices: list[SimulatedDevice]
    processes: list[SimulatedProcess]
    nvml_missing_reason: str | None = None
    psi_some_avg10: float = 0.0
    sample_index: int = 0
    extra_used_bytes: int = 0  # tests and demos push memory pressure here
    gpu_lost: bool = False
    shmem_bytes: int = 0
    mlocked_bytes: int = 0
    # a container: NVML lists host PIDs (the namespace's PID + this offset), which this namespace cannot see
    container_pid_offset: int = 0
    # a load that plunges (vLLM #54200): MemAvailable falls at this rate for plunge_s seconds after
    # start_load() (wall clock: the guard measures time for real), then holds
    plunge_bytes_s: float = 0.0
    plunge_s: float = 0.0
    # a load that streams a checkpoint into page cache (the GB10 wedge, vLLM #56824): Cached grows at this rate
    # for cache_growth_s seconds after start_load(), so MemFree falls while MemAvailable (which counts the
    # cache as available) stays where it was
    cache_growth_bytes_s: float = 0.0
    cache_growth_s: float = 0.0
    load_started: float | None = None
    monotonic: Callable[[], float] = time.monotonic  # the load's clock; a test may drive it by hand
    # None: MemAvailable from other_host_bytes (the profiles). Set: from independent parts - the kernel's own
    # memory, each process's host memory (RSS), shared memory and, on unified memory, the GPU allocations -
    # so that a test of the formulas is not the formulas run backwards
    kernel_bytes: int | None = None
    host_fallback: LocalHostProbe = field(default_factory=LocalHostProbe)

    def start_load(self) -> None:
        self.load_started = self.monotonic()

    def _grown(self, rate_bytes_s: float, duration_s: float) -> int:
        if self.load_started is None or not rate_bytes_s:
            return 0
        return int(rate_bytes_s * min(duration_s, self.monotonic() - self.load_started))

    def plunged_bytes(self) -> int:
        return self._grown(self.plunge_bytes_s, self.plunge_s)

    def page_cache_bytes(self) -> int:
        return self.cached_bytes + self._grown(self.cache_growth_bytes_s, self.cache_growth_s)

    def wobble(self, amplitude: int, phase: float = 0.0) -> int:
        return int(amplitude * (0.5 + 0.5 * math.sin(self.sample_index / 6.0 + phase)))

    def gpu_bytes(self, proc: SimulatedProcess) -> int:
        if not proc.gpu_bytes:
            return 0
        return proc.gpu_bytes + self.wobble(proc.wobble_bytes, proc.pid % 7)

    @property
    def unified(self) -> bool:
        return any(d.memory_total_bytes is None or d.shim for d in self.devices)

    def mem_available_bytes(self) -> int:
        if self.kernel_bytes is not None:
            host = self.kernel_bytes + sum(p.rss_bytes for p in self.processes) + self.shmem_bytes
        else:
            host = self.other_host_bytes
        used = host + self.extra_used_bytes + self.plunged_bytes()
        if self.unified:
            used += sum(self.gpu_bytes(p) for p in self.processes)
        return max(0, self.mem_total_bytes - used)


class SimulatedNvml:
    """Answers NVML's queries from a :class:`SimulatedMachine`, errors included."""

    def __init__(self, machine: SimulatedMachine) -> None:
        self.machine = machine

    def init(self) -> None:
        if self.machine.nvml_missing_reason:
            raise NvmlUnavailable(self.machine.nvml_missing_reason)

    def shutdown(self) -> None:
        pass

    def device_count(self) -> int:
        return len(self.machine.devices)

    def _device(self, index: int) -> SimulatedDevice:
        if self.machine.gpu_lost:
            raise NvmlQueryError("GPU is lost")
        return self.machine.devices[index]

    def name(self, index: int) -> str:
        return self._device(index).name

    def memory_info(self, index: int) -> tuple[int, int, int]:
        device = self._device(index)
        if device.shim:  # what nvml-unified-shim answers: the host's figures
            available = self.machine.mem_available_bytes()
            total = self.machine.mem_total_bytes
            return total, total - available, available
        if device.memory_total_bytes is None:
            raise NvmlNotSupported("nvmlDeviceGetMemoryInfo")
        used = device.driver_reserved_bytes + sum(self.machine.gpu_bytes(p) for p in self.machine.processes)
        used = min(used, device.memory_total_bytes)
        return device.memory_total_bytes, used, device.memory_total_bytes - used

    def processes(self, index: int) -> list[GpuProcessUsage]:
        self._device(index)
        # as NVML answers: the compute list, then the graphics list; a "C+G" process is in both
        return [
            GpuProcessUsage(p.pid + self.machine.container_pid_offset, self.machine.gpu_bytes(p), kind)
            for kind in ("compute", "graphics")
            for p in self.machine.processes
            if p.gpu_bytes and p.gpu_kind in (kind, "C+G")
        ]

    def utilization_pct(self, index: int) -> int:
        base = self._device(index).utilization_pct
        return min(100, base + self.machine.wobble(20, 1.0)) if base else 0

    def temperature_c(self, index: int) -> int:
        return self._device(index).temperature_c + self.machine.wobble(3, 2.0)

    def power_w(self, index: int) -> float:
        return round(self._device(index).power_w + self.machine.wobble(15, 1.0), 1)

    def sm_clock_mhz(self, index: int) -> int:
        return self._device(index).sm_clock_mhz

    def compute_capability(self, index: int) -> tuple[int, int]:
        return self._device(index).compute_capability

    def addressing_mode(self, index: int) -> int:
        mode = self._device(index).addressing_mode
        if mode is None:
            raise NvmlNotSupported("nvmlDeviceGetAddressingMode")
        return mode


class SimulatedHost:
    """Answers the host probe's queries from a :class:`SimulatedMachine`.

    Processes the profile does not know (for instance a real job child started
    while simulating) are read from the real machine, so a job's memory is real.
    """

    def __init__(self, machine: SimulatedMachine) -> None:
        self.machine = machine

    def meminfo(self) -> dict[str, int]:
        m = self.machine
        m.sample_index += 1
        if (m.plunge_bytes_s or m.cache_growth_bytes_s) and m.load_started is None:
            m.start_load()
        available = m.mem_available_bytes()
        cached = m.page_cache_bytes()
        return {
            "MemTotal": m.mem_total_bytes,
            "MemAvailable": available,
            "MemFree": max(0, available - cached),
            "Cached": cached,
            "SReclaimable": m.sreclaimable_bytes,
            "SwapTotal": m.swap_total_bytes,
            "SwapFree": m.swap_total_bytes,
            "Hugetlb": 0,
            "Shmem": m.shmem_bytes,
            "Mlocked": m.mlocked_bytes,
        }

    def pressure(self) -> PressureStall | None:
        some = round(self.machine.psi_some_avg10 + self.machine.wobble(2, 3.0) / 10, 2)
        return PressureStall(some_avg10=some, full_avg10=round(some / 4, 2))

    def process(self, pid: int) -> tuple[str, int] | None:
        for proc in self.machine.processes:
            if proc.pid == pid:
                return proc.name, proc.rss_bytes
        if self.machine.container_pid_offset and pid > self.machine.container_pid_offset:
            return None  # a host PID from NVML: not visible inside the container
        return self.machine.host_fallback.process(pid)

    def in_container(self) -> bool:
        return bool(self.machine.container_pid_offset)

    def top_processes(self, count: int) -> list[tuple[int, str, int]]:
        rows = [(p.pid, p.name, p.rss_bytes) for p in self.machine.processes]
        rows.sort(key=lambda row: row[2], reverse=True)
        return rows[:count]


def machine_for(profile: str) -> SimulatedMachine:
    """A fresh :class:`SimulatedMachine` for one of ``PROFILES``.

    Besides the machines (``none``, ``h100``, ``gb10``, ``gh200``), the cases the guard and the
    attribution must survive (FACTS §9): ``gb10-plunge`` (a load during which free memory falls from
    29 to 2.5 GiB in 9 s; it starts with the first sample), ``gb10-pagecache`` (a load whose page cache
    takes MemFree from 12 to 1 GiB in 5.5 s while MemAvailable stays at 22.5 GiB; it starts with the first
    sample), ``gb10-container`` (NVML lists host PIDs), ``gb10-shim`` (an LD_PRELOAD shim answers
    ``nvmlDeviceGetMemoryInfo`` with total = MemTotal), ``jetson`` and ``thor`` (integrated GPUs known by name).
    ``gh200`` has ATS addressing like an integrated GPU, but its own HBM and a memory query that answers.
    """
    if profile == "gb10-plunge":
        machine = machine_for("gb10")
        machine.name = profile
        # 29 GiB available when the plunge starts, 2.5 GiB nine seconds later (vLLM #54200)
        machine.extra_used_bytes = machine.mem_available_bytes() - 29 * GIB
        machine.plunge_bytes_s, machine.plunge_s = 26.5 * GIB / 9, 9.0
        # allocations, not page cache, take the memory here: with little cache MemFree follows MemAvailable down,
        # and the trend rule acts before MemFree reaches the 8 GiB floor (gb10-pagecache is the other case)
        machine.cached_bytes = 2 * GIB
        return machine
    if profile == "gb10-pagecache":
        # vLLM #56824: NV_ERR_NO_MEMORY with MemAvailable at ~22 GiB; PR #19 of GLM-5.3-Flash-NVFP4-DFlash2-2x-DGX-Spark:
        # the checkpoint streamed into page cache leaves no free pages. Nothing else moves (no wobble), so
        # MemAvailable is flat and only MemFree tells: 12 GiB free at the start, 2 GiB/s of checkpoint read
        # for 5.5 s, 1 GiB free at the end.
        machine = machine_for("gb10")
        machine.name = profile
        machine.processes = [replace(p, wobble_bytes=0) for p in machine.processes]
        machine.extra_used_bytes = machine.mem_available_bytes() - int(22.5 * GIB)
        machine.cached_bytes = int(10.5 * GIB)
        machine.cache_growth_bytes_s, machine.cache_growth_s = 2 * GIB, 5.5
        return machine
    if profile == "gb10-container":
        machine = machine_for("gb10")
        machine.name, machine.container_pid_offset = profile, 400_000
        return machine
    if profile == "gb10-shim":
        machine = machine_for("gb10")
        machine.name = profile
        machine.devices = [replace(machine.devices[0], shim=True)]
        return machine
    if profile in ("jetson", "thor"):
        machine = machine_for("gb10")
        machine.name = profile
        if profile == "jetson":  # Jetson AGX Orin 64 GB: the driver names it "Orin (nvgpu)"
            machine.mem_total_bytes = 62_800_000 * 1024
            machine.devices = [replace(machine.devices[0], name="Orin (nvgpu)", compute_capability=(8, 7),
                                       power_w=22.0, sm_clock_mhz=1300)]
            machine.processes = [replace(p, gpu_bytes=p.gpu_bytes // 3) for p in machine.processes]
        else:  # Jetson AGX Thor, 128 GB
            machine.devices = [replace(machine.devices[0], name="NVIDIA Thor", compute_capability=(11, 0))]
        return machine
    if profile == "gb10":
        # DGX Spark: 128 GB LPDDR5X, MemTotal 127,600,748 kB ≈ 121.7 GiB usable.
        return SimulatedMachine(
            name="gb10",
            mem_total_bytes=127_600_748 * 1024,
            other_host_bytes=int(6.8 * GIB),
            cached_bytes=int(11.5 * GIB),
            sreclaimable_bytes=int(0.9 * GIB),
            swap_total_bytes=0,
            devices=[
                SimulatedDevice(
                    name="NVIDIA GB10",
                    compute_capability=(12, 1),
                    memory_total_bytes=None,  # nvmlDeviceGetMemoryInfo: NOT_SUPPORTED
                    utilization_pct=38,
                    temperature_c=52,
                    power_w=31.0,
                    sm_clock_mhz=2405,
                )
            ],
            processes=[
                SimulatedProcess(4242, "vllm serve", int(2.1 * GIB), gpu_bytes=int(30.0 * GIB)),
                SimulatedProcess(5151, "python3", int(1.4 * GIB), gpu_bytes=int(3.2 * GIB),
                                 wobble_bytes=int(1.5 * GIB)),
                SimulatedProcess(1880, "Xorg", 180 * MIB, gpu_bytes=96 * MIB, gpu_kind="graphics"),
                SimulatedProcess(2210, "jupyter-lab", int(0.7 * GIB)),
                SimulatedProcess(901, "dockerd", 160 * MIB),
            ],
            psi_some_avg10=0.4,
            shmem_bytes=int(1.6 * GIB),
            mlocked_bytes=64 * MIB,
        )
    if profile == "gh200":
        # Grace Hopper GH200 480GB: 96 GB HBM3 at 4.0 TB/s on the Hopper side (nvidia-smi: 97871 MiB), 480 GB
        # LPDDR5X on the Grace side (nominal). ATS addressing reaches host memory, but the HBM is its own and
        # nvmlDeviceGetMemoryInfo answers: not unified memory (reviews/gpu-audit.md P2-10 (b)).
        return SimulatedMachine(
            name="gh200",
            mem_total_bytes=480 * 10**9,
            other_host_bytes=int(24.0 * GIB),
            cached_bytes=int(40.0 * GIB),
            sreclaimable_bytes=int(2.5 * GIB),
            swap_total_bytes=0,
            devices=[
                SimulatedDevice(
                    name="NVIDIA GH200 480GB",
                    compute_capability=(9, 0),
                    memory_total_bytes=97_871 * MIB,
                    driver_reserved_bytes=530 * MIB,
                    addressing_mode=ADDRESSING_MODE_ATS,
                    utilization_pct=55,
                    temperature_c=38,
                    power_w=410.0,
                    sm_clock_mhz=1980,
                )
            ],
            processes=[
                SimulatedProcess(7100, "vllm serve", int(8.4 * GIB), gpu_bytes=int(71.0 * GIB)),
                SimulatedProcess(7180, "python3", int(2.6 * GIB), gpu_bytes=int(3.5 * GIB),
                                 wobble_bytes=int(1.5 * GIB)),
                SimulatedProcess(1500, "slurmd", int(0.2 * GIB)),
            ],
            psi_some_avg10=0.0,
        )
    if profile == "h100":
        return SimulatedMachine(
            name="h100",
            mem_total_bytes=251 * GIB,
            other_host_bytes=int(18.5 * GIB),
            cached_bytes=int(64.0 * GIB),
            sreclaimable_bytes=int(3.0 * GIB),
            swap_total_bytes=8 * GIB,
            devices=[
                SimulatedDevice(
                    name="NVIDIA H100 80GB HBM3",
                    compute_capability=(9, 0),
                    memory_total_bytes=81_559 * MIB,
                    driver_reserved_bytes=530 * MIB,
                    addressing_mode=0,
                    utilization_pct=61,
                    temperature_c=47,
                    power_w=312.0,
                    sm_clock_mhz=1980,
                )
            ],
            processes=[
                SimulatedProcess(31337, "vllm serve", int(9.6 * GIB), gpu_bytes=int(62.0 * GIB)),
                SimulatedProcess(31400, "python3", int(3.1 * GIB), gpu_bytes=int(4.0 * GIB),
                                 wobble_bytes=int(2.0 * GIB)),
                SimulatedProcess(1200, "postgres", int(2.2 * GIB)),
                SimulatedProcess(1300, "node", int(0.9 * GIB)),
            ],
            psi_some_avg10=0.0,
        )
    if profile == "none":
        return SimulatedMachine(
            name="none",
            mem_total_bytes=32 * GIB,
            other_host_bytes=int(9.2 * GIB),
            cached_bytes=int(7.5 * GIB),
            sreclaimable_bytes=int(0.6 * GIB),
            swap_total_bytes=2 * GIB,
            devices=[],
            processes=[
                SimulatedProcess(2020, "python3", int(2.6 * GIB)),
                SimulatedProcess(2100, "firefox", int(1.9 * GIB)),
                SimulatedProcess(2150, "code", int(1.1 * GIB)),
            ],
            nvml_missing_reason="no NVIDIA driver library (libnvidia-ml) on this machine",
            psi_some_avg10=0.1,
        )
    raise ValueError(f"unknown hardware profile {profile!r}; choose one of {', '.join(PROFILES)}")


def simulated_sampler(profile: str, reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> TelemetrySampler:
    """A sampler wired to a simulated machine and a frozen, ticking clock."""
    machine = machine_for(profile)

    def clock() -> float:
        return SIMULATED_EPOCH_S + machine.sample_index

    return TelemetrySampler(
        nvml=SimulatedNvml(machine),
        host=SimulatedHost(machine),
        reserve_bytes=reserve_bytes,
        simulated=profile,
        clock=clock,
    )


def make_sampler(simulate: str | None, reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> TelemetrySampler:
    """Real telemetry, or the named simulated profile (see ``PROFILES``)."""
    if simulate is None:
        return local_sampler(reserve_bytes)
    return simulated_sampler(simulate, reserve_bytes=reserve_bytes)
