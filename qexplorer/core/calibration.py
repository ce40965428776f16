"""How fast this machine is at the four kinds of work a job does, measured in seconds on first use.

The ETA's default costs (:data:`qexplorer.core.eta.DEFAULT_COSTS`) were fitted on one machine. On another, each
phase's cost moves with the kind of work it is (its :class:`Bound`): the interpreter and imports with one core's
speed, PyTorch's BF16 work (transformers, vLLM-CPU, llm-compressor) with BF16 matrix throughput - which is what
collapses on a CPU without AVX-512 BF16 (FACTS §10: vLLM's BF16 ran 2-2.5× slower on the AVX2 EPYC than on the
AVX-512 Xeon) - llama.cpp's own kernels and the converter with FP32 SIMD throughput, decoding with memory
bandwidth. :func:`measure` takes about two seconds (plus importing torch) and runs in its own process
(:func:`measure_in_child`), so that neither the app nor ``plan`` imports torch; the result is kept per machine in ``durations.json`` beside the rates learned there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
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
        for i in range(1_000_000):
            total += i * i

    # each timed piece lasts tens of milliseconds and the best of several counts: a VM's scheduling hiccups
    # only ever make a piece slower, so the best is the machine's speed. The product goes into one output
    # tensor: allocating a new one per call cost a third of the figure and most of its spread.
    python_s = _best_of(7, python_loop)
    gflops = {}
    rounds = 20
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
        out = torch.empty(512, 512, dtype=dtype)

        def product(a: Any = a, b: Any = b, out: Any = out) -> None:
            for _ in range(rounds):
                torch.mm(a, b, out=out)

        product()  # the first calls pick and warm the kernel
        seconds = _best_of(7, product)
        gflops[dtype] = rounds * 2 * 512**3 / seconds / 1e9
    copy = measure_host_bandwidth(threads, size_bytes=128 * 1024 * 1024, repeats=7)
    return Calibration(python_mops=2.0 / python_s, bf16_gflops=gflops[torch.bfloat16],
                       fp32_gflops=gflops[torch.float32], copy_gbs=copy / 1e9, threads=threads)


def measure_in_child(threads: int, timeout_s: float = TIMEOUT_S) -> Calibration | None:
    """:func:`measure` in a fresh interpreter (torch stays out of the caller); None when it could not run."""
    with tempfile.TemporaryDirectory(prefix="qexplorer-calibration-") as tmp:
        out = Path(tmp) / "calibration.json"
        code = ("import json, pathlib; from qexplorer.core.calibration import measure; "
                f"pathlib.Path({str(out)!r}).write_text(json.dumps(measure({int(threads)}).to_json()))")
        try:
            subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=timeout_s, check=True)
            return Calibration.from_json(json.loads(out.read_text(encoding="utf-8")))
        except (OSError, subprocess.SubprocessError, ValueError):
            return None


def enabled() -> bool:
    return not os.environ.get(NO_CALIBRATION_ENV)

