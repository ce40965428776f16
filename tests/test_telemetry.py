"""The FACTS §1 formulas, through a fake NVML that raises what the real one raises."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import machine, sampler

from qexplorer.core.procfs import parse_pressure, read_meminfo
from qexplorer.core.simulate import SimulatedDevice, SimulatedProcess, simulated_sampler
from qexplorer.core.telemetry import ADDRESSING_MODE_ATS, is_unified
from qexplorer.core.units import GIB, MIB

GB10 = SimulatedDevice(name="NVIDIA GB10", compute_capability=(12, 1), memory_total_bytes=None)
PROCS = [
    SimulatedProcess(10, "vllm", 2 * GIB, gpu_bytes=30 * GIB),
    SimulatedProcess(11, "python3", 1 * GIB, gpu_bytes=512 * MIB),
    SimulatedProcess(12, "Xorg", 100 * MIB, gpu_bytes=64 * MIB, gpu_kind="graphics"),
    SimulatedProcess(13, "sshd", 10 * MIB),
]


def test_unified_gpu_used_is_sum_of_process_allocations_and_headroom_is_available_minus_reserve():
    m = machine([GB10], PROCS, total=120 * GIB, other=7 * GIB)
    snap = sampler(m, reserve=8 * GIB).sample()
    device = snap.devices[0]
    gpu_sum = 30 * GIB + 512 * MIB + 64 * MIB
    assert device.unified is True
    assert device.gpu_used_bytes.value == gpu_sum
    assert device.gpu_used_bytes.source == "nvml processes"
    mem_available = snap.host.available_bytes.value
    assert mem_available == 120 * GIB - 7 * GIB - gpu_sum
    assert device.headroom_bytes.value == mem_available - 8 * GIB
    assert snap.host_headroom_bytes.value == mem_available - 8 * GIB
    assert device.other_host_bytes.value == (120 * GIB - mem_available) - gpu_sum == 7 * GIB
    # optimistic: MemAvailable + SwapFree - HugeTLB
    assert device.optimistic_headroom_bytes.value == mem_available + 2 * GIB
    assert device.memory_total_bytes.value == 120 * GIB
    # The wrong figure (what nvtop shows) is not what we call GPU used.
    assert device.gpu_used_bytes.value != snap.host.used_bytes.value
    assert snap.headroom_for(on_gpu=True) == snap.host_headroom_bytes


def test_processes_carry_gpu_bytes_rss_and_own_job_flag():
    m = machine([GB10], PROCS)
    s = sampler(m)
    s.own_pids = frozenset({11})
    snap = s.sample()
    by_pid = {p.pid: p for p in snap.processes}
    assert by_pid[10].gpu_bytes == 30 * GIB and by_pid[10].rss_bytes == 2 * GIB
    assert by_pid[11].own_job and not by_pid[10].own_job
    assert by_pid[13].gpu_bytes is None
    assert [p.pid for p in snap.processes][0] == 10  # sorted by memory


def test_discrete_card_uses_memory_info():
    h100 = SimulatedDevice(name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0),
                           memory_total_bytes=80 * GIB, driver_reserved_bytes=512 * MIB, addressing_mode=0)
    snap = sampler(machine([h100], PROCS)).sample()
    device = snap.devices[0]
    used = 512 * MIB + 30 * GIB + 512 * MIB + 64 * MIB
    assert device.unified is False
    assert device.memory_total_bytes.value == 80 * GIB
    assert device.gpu_used_bytes.value == used
    assert device.headroom_bytes.value == 80 * GIB - used
    assert device.other_host_bytes.value is None
    assert snap.headroom_for(on_gpu=True) == device.headroom_bytes
    assert snap.headroom_for(on_gpu=False) == snap.host_headroom_bytes


def test_discrete_not_supported_is_unknown_never_host_numbers():
    lost = SimulatedDevice(name="NVIDIA A100-SXM4-40GB MIG 1g.5gb", compute_capability=(8, 0),
                           memory_total_bytes=None)
    snap = sampler(machine([lost], PROCS)).sample()
    device = snap.devices[0]
    assert device.unified is None
    for reading in (device.memory_total_bytes, device.gpu_used_bytes, device.headroom_bytes):
        assert reading.value is None and reading.source == "unavailable"
    assert "NOT_SUPPORTED" in device.memory_note


def test_no_library_is_a_normal_state():
    snap = sampler(machine([], PROCS[3:], missing="no NVIDIA driver library")).sample()
    assert snap.devices == ()
    assert snap.nvml_status == "no NVIDIA driver library"
    assert snap.host.total_bytes.value == 100 * GIB
    assert snap.host_headroom_bytes.value == snap.host.available_bytes.value - 8 * GIB


def test_no_gpu_with_library_present():
    snap = sampler(machine([], PROCS[3:])).sample()
    assert snap.devices == () and snap.nvml_status == "no NVIDIA GPU found"


def test_gpu_lost_mid_run_says_telemetry_lost_and_keeps_host():
    m = machine([GB10], PROCS)
    s = sampler(m)
    assert s.sample().devices
    m.gpu_lost = True
    snap = s.sample()
    assert snap.devices == ()
    assert snap.nvml_status.startswith("telemetry lost")
    assert snap.host.available_bytes.value is not None


@pytest.mark.parametrize(
    ("name", "supported", "mode", "expected"),
    [
        ("NVIDIA GB10", False, None, True),
        ("NVIDIA Jetson AGX Thor", False, None, True),
        ("Some future SoC", False, ADDRESSING_MODE_ATS, True),
        ("NVIDIA H100 80GB HBM3", True, 0, False),
        ("NVIDIA H100 80GB HBM3", False, None, None),
        # ATS with its own HBM that the memory query reports: Grace Hopper / Grace Blackwell (audit P2-10 (b))
        ("NVIDIA GH200 480GB", True, ADDRESSING_MODE_ATS, False),
        ("NVIDIA GB200", True, ADDRESSING_MODE_ATS, False),
        ("NVIDIA GB10", True, ADDRESSING_MODE_ATS, True),  # a shim answering on GB10: the name wins
    ],
)
def test_unified_detection(name, supported, mode, expected):
    assert is_unified(name, supported, mode) is expected


def test_profiles_gb10_h100_none():
    gb10 = simulated_sampler("gb10").sample()
    assert gb10.unified and gb10.devices[0].memory_total_bytes.value == 127_600_748 * 1024
    procs_gpu = sum(p.gpu_bytes or 0 for p in gb10.processes)
    assert gb10.devices[0].gpu_used_bytes.value == procs_gpu
    h100 = simulated_sampler("h100").sample()
    assert not h100.unified and h100.devices[0].memory_total_bytes.value == 81_559 * MIB
    none = simulated_sampler("none").sample()
    assert none.devices == () and "no NVIDIA" in none.nvml_status
    with pytest.raises(ValueError, match="unknown hardware profile"):
        simulated_sampler("tpu")


def test_meminfo_and_pressure_parsers(tmp_path: Path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       127600748 kB\nCached:  1000 kB\nSReclaimable: 24 kB\nHugetlb: 0 kB\n")
    assert read_meminfo(str(meminfo), ["Cached", "SReclaimable", "Hugetlb", "Missing"]) == {
        "Cached": 1000 * 1024, "SReclaimable": 24 * 1024, "Hugetlb": 0}
    assert read_meminfo(str(tmp_path / "absent"), ["Cached"]) == {}
    psi = parse_pressure("some avg10=1.50 avg60=0.20 avg300=0.00 total=1\nfull avg10=0.25 avg60=0 avg300=0 total=0\n")
    assert psi is not None and psi.some_avg10 == 1.5 and psi.full_avg10 == 0.25
    assert parse_pressure("garbage") is None


def test_discrete_used_memory_leaves_out_the_drivers_reservation_like_nvidia_smi():
    """Seen on an H100 80GB HBM3 (scripts/gpu_check.py): nvmlDeviceGetMemoryInfo v1 said 480 MiB used on an idle
    card where nvidia-smi said 0 MiB - v1 counts the driver's reservation. The backend asks for v2 first."""
    from types import SimpleNamespace

    from qexplorer.core.nvml import PynvmlBackend

    class NVMLError(Exception):
        def __init__(self, value):
            self.value = value

    def fake_nvml(has_v2: bool):
        def memory_info(handle, version=None):
            if version is None:
                return SimpleNamespace(total=80 * GIB, used=480 * 2**20, free=80 * GIB - 480 * 2**20)
            if not has_v2:
                raise NVMLError(13)  # NVML_ERROR_FUNCTION_NOT_FOUND: an old driver
            return SimpleNamespace(total=80 * GIB, reserved=480 * 2**20, used=0, free=80 * GIB - 480 * 2**20)

        return SimpleNamespace(NVMLError=NVMLError, NVML_ERROR_NOT_SUPPORTED=3, nvmlMemory_v2=0x2000028,
                               nvmlDeviceGetMemoryInfo=memory_info)

    backend = PynvmlBackend()
    backend._handles = [object()]
    backend._nvml = fake_nvml(has_v2=True)
    assert backend.memory_info(0) == (80 * GIB, 0, 80 * GIB - 480 * 2**20)
    backend._nvml = fake_nvml(has_v2=False)
    assert backend.memory_info(0)[1] == 480 * 2**20  # v1 where v2 does not exist


def test_unified_formulas_against_a_pool_built_from_independent_parts():
    """The pool is the kernel's memory, each process's RSS, shared memory and the GPU allocations; MemAvailable is
    what they leave (not the formula run backwards). A process with compute and graphics contexts is listed by
    NVML in both lists (A7): counted once, shown as C+G."""
    procs = [SimulatedProcess(10, "vllm", 2 * GIB, gpu_bytes=30 * GIB),
             SimulatedProcess(11, "python3", 1 * GIB, gpu_bytes=512 * MIB),
             SimulatedProcess(12, "Xorg", 100 * MIB, gpu_bytes=64 * MIB, gpu_kind="C+G"),
             SimulatedProcess(13, "sshd", 10 * MIB)]
    m = machine([GB10], procs, total=120 * GIB)
    m.kernel_bytes, m.shmem_bytes = 3 * GIB, 2 * GIB
    snap = sampler(m, reserve=8 * GIB).sample()
    device = snap.devices[0]
    assert device.gpu_used_bytes.value == 30 * GIB + 512 * MIB + 64 * MIB  # Xorg once, not twice
    host_parts = 3 * GIB + (2 * GIB + 1 * GIB + 100 * MIB + 10 * MIB) + 2 * GIB
    assert device.other_host_bytes.value == host_parts
    assert device.other_host_bytes.value >= 0
    assert snap.host_headroom_bytes.value == 120 * GIB - host_parts - device.gpu_used_bytes.value - 8 * GIB
    xorg = next(p for p in snap.processes if p.pid == 12)
    assert xorg.gpu_bytes == 64 * MIB


def test_nvml_lists_are_merged_by_pid():
    from qexplorer.core.kinds import ProcessKind
    from qexplorer.core.nvml import GpuProcessUsage
    from qexplorer.core.telemetry import merge_by_pid

    merged = merge_by_pid([GpuProcessUsage(5, 100, ProcessKind.COMPUTE), GpuProcessUsage(6, 7, ProcessKind.COMPUTE),
                           GpuProcessUsage(5, 100, ProcessKind.GRAPHICS), GpuProcessUsage(7, None, ProcessKind.GRAPHICS)])
    assert merged == [GpuProcessUsage(5, 100, ProcessKind.COMPUTE_GRAPHICS), GpuProcessUsage(6, 7, ProcessKind.COMPUTE),
                      GpuProcessUsage(7, None, ProcessKind.GRAPHICS)]
