"""The one small interface every engine implements: start an artifact, measure it, say what ran it, stop.

An engine module has ``measure(ctx: EngineContext) -> Step[Measured]``. It gets
the artifact (the file or folder the user will serve), the job, the quality
reference (or None) and the machine; it returns speed, memory, the engine's own
description (name, version, kernel, the serve command) and, where it measures
them, quality statistics. The pipeline does not know which engine it talks to.

=============  =====================================  ========================
engine         runs                                   how
=============  =====================================  ========================
llama.cpp      GGUF files                             in the worker, llama-cpp-python
vLLM           compressed-tensors / plain folders     ``vllm serve`` child on loopback
transformers   any Hugging Face folder (fallback)     in the worker, weights dequantized
=============  =====================================  ========================
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qexplorer.core.device import CPU_DEVICE, DeviceMemory
from qexplorer.core.domain.events import Cancelled, JobEvent, checked
from qexplorer.core.domain.record import (
    EngineInfo,
    MemoryFigures,
    QualityStats,
    ServerQuality,
    ServerSweep,
    Speed,
    TaskScore,
    Timings,
)
from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.kinds import SupportMode
from qexplorer.core.model import ModelSpec
from qexplorer.core.precisions import Precision

T = TypeVar("T")


@dataclass(frozen=True)
class Measured:
    """What an engine hands back to the pipeline."""

    engine: EngineInfo
    memory: MemoryFigures
    timings: Timings
    speed: Speed
    quality: QualityStats | None
    gpu_name: str | None
    engine_quality: ServerQuality | None = None
    quality_s: float | None = None
    depth_speeds: tuple[Speed, ...] = ()  # the depths after the first (BenchConfig.depths)
    tasks: tuple[TaskScore, ...] = ()  # the task pass, with this engine (core.tasks.run)
    task_error: str | None = None  # why the task pass failed; what was measured before it is kept
    server: ServerSweep | None = None  # the load sweep against this engine's own server (JobSpec.load)


@dataclass(frozen=True)
class EngineContext:
    spec: ModelSpec
    precision: Precision
    job: JobSpec
    artifact: Path
    artifact_weight_bytes: int
    reference: Any  # (ReferenceMeta, arrays) or None
    support_mode: SupportMode  # how the precision runs on this hardware (native / emulated)
    device: str  # "cpu" or "cuda": where PyTorch runs in this worker
    gpu_name: str | None
    bench_text: str
    cancel: threading.Event | None = None
    target: DeviceMemory = CPU_DEVICE  # the device a serving engine (vLLM) starts on; simulated in tests

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def check(self) -> None:
        if self.cancelled():
            raise Cancelled()

    def checked(self, gen: Generator[JobEvent, None, T]) -> Generator[JobEvent, None, T]:
        """Pass ``gen``'s events through, checking for cancel after each; return its value."""
        return checked(gen, self.cancel)


def current_rss_bytes() -> int:
    """This process's resident memory now."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """This process's own high-water RSS: ``VmHWM`` of /proc/self/status.

    Not ``getrusage().ru_maxrss``: Linux keeps that across fork and exec, so a worker started by a large parent
    (a benchmark script that had built a model: 1,342 MiB) reported the parent's peak as its own."""
    from qexplorer.core.procfs import read_meminfo

    found = read_meminfo("/proc/self/status", ("VmHWM",)).get("VmHWM")
    if found:
        return found
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def nvml_gpu_name(index: int = 0) -> str | None:
    """The GPU's name as NVML gives it (for the published-bandwidth table), or None without a GPU."""
    from qexplorer.core.nvml import NvmlNotSupported, NvmlQueryError, NvmlUnavailable, PynvmlBackend

    backend = PynvmlBackend()
    try:
        backend.init()
        return backend.name(index) if backend.device_count() > index else None
    except (NvmlUnavailable, NvmlNotSupported, NvmlQueryError):
        return None
    finally:
        backend.shutdown()


Measure = Callable[[EngineContext], Generator[JobEvent, None, Measured]]
