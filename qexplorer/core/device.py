"""The device a job's engine will run on, read the way vLLM's start-up check reads it.

* :func:`local_device` (in the worker): ``torch.cuda.mem_get_info`` on a card; on an integrated GPU
  (``get_device_properties().is_integrated``: GB10, Jetson) free memory is MemAvailable, as vLLM's
  ``utils/mem_utils.py`` (l. 143-151, vLLM 0.32) reads it. Without CUDA: the CPU.
* :func:`device_from_snapshot` (in the parent, for the plan): the same figures from telemetry.
* ``QEXPLORER_SIMULATE_DEVICE=PROFILE[:HELD_GIB]`` makes a job see one of the simulated machines
  (``core.simulate``: gb10, h100, gh200, ...) idle, with HELD_GIB taken by another process - so the GPU path
  (vLLM's flags, its start-up check, the kernel it logs) runs end to end against a contract fake of
  ``vllm serve`` on a machine without a GPU. Everything it produces is labelled "simulated".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from qexplorer.core.units import GIB

SIMULATE_DEVICE_ENV = "QEXPLORER_SIMULATE_DEVICE"


@dataclass(frozen=True)
class DeviceMemory:
    """The device vLLM will start on, as vLLM's start-up check reads it."""

    kind: str  # "cpu" or "cuda"
    name: str = "CPU"
    compute_capability: tuple[int, int] | None = None
    unified: bool = False  # an integrated GPU: vLLM reads free memory as MemAvailable
    total_bytes: int | None = None  # cudaMemGetInfo's total
    free_bytes: int | None = None  # cudaMemGetInfo's free; MemAvailable on an integrated GPU
    source: str = ""  # "torch.cuda.mem_get_info", "MemAvailable (integrated GPU)", "simulated gb10", ...
    simulated: str | None = None  # the profile, when simulated

    @property
    def cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def label(self) -> str:
        """What ran it, for the record: "cuda", "cpu", or "cuda (simulated gb10)"."""
        return f"{self.kind} (simulated {self.simulated})" if self.simulated else self.kind


CPU_DEVICE = DeviceMemory("cpu")


def simulated_device(spec: str) -> DeviceMemory:
    """``"gb10"`` or ``"gb10:60"`` (60 GiB held by another process) → the profile's first GPU, idle."""
    from qexplorer.core.simulate import machine_for

    profile, _, held = spec.partition(":")
    held_bytes = int(float(held) * GIB) if held else 0
    machine = machine_for(profile)
    if not machine.devices:
        return DeviceMemory("cpu", source=f"simulated {profile}", simulated=profile)
    machine.processes = []  # idle: only what the test says another process holds
    device = machine.devices[0]
    if machine.unified:
        total, free = machine.mem_total_bytes, machine.mem_available_bytes() - held_bytes
        source = f"simulated {profile}: MemAvailable (integrated GPU)"
    else:
        total = int(device.memory_total_bytes or 0)
        free = total - device.driver_reserved_bytes - held_bytes
        source = f"simulated {profile}: cudaMemGetInfo"
    return DeviceMemory("cuda", device.name, device.compute_capability, machine.unified, total, max(0, free),
                        source, simulated=profile)


def local_device(use_cuda: bool = True) -> DeviceMemory:
    """This worker's device now (``use_cuda=False``: a GGUF job, which never imports torch for it)."""
    spec = os.environ.get(SIMULATE_DEVICE_ENV)
    if spec:
        return simulated_device(spec)
    if not use_cuda:
        return CPU_DEVICE
    import torch

    if not torch.cuda.is_available():
        return CPU_DEVICE
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    integrated = bool(getattr(props, "is_integrated", False))
    source = "torch.cuda.mem_get_info"
    if integrated:  # vLLM's own reading on an integrated GPU (utils/mem_utils.py l. 143-151)
        import psutil

        free, source = psutil.virtual_memory().available, "MemAvailable (integrated GPU)"
    return DeviceMemory("cuda", torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0)),
                        integrated, int(total), int(free), source)


def device_from_snapshot(snapshot: object) -> DeviceMemory:
    """The first GPU of a telemetry snapshot as vLLM would read it (the CPU when there is none)."""
    devices = getattr(snapshot, "devices", ())
    if not devices:
        return CPU_DEVICE
    device, host = devices[0], snapshot.host  # type: ignore[attr-defined]
    simulated = getattr(snapshot, "simulated", None)
    if device.unified:
        total, free, source = host.total_bytes.value, host.available_bytes.value, "MemAvailable (unified memory)"
    else:
        total, free = device.memory_total_bytes.value, device.headroom_bytes.value  # NVML's free: reserved counts
        source = "NVML free"
    return DeviceMemory("cuda", device.name, device.compute_capability, bool(device.unified),
                        None if total is None else int(total), None if free is None else int(free),
                        f"simulated {simulated}: {source}" if simulated else source, simulated=simulated)
