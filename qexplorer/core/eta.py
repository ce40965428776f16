"""How long a job will take, before it runs, and how long it took: the ETA on the plan and jobs screens.

A job is a sequence of phases (the worker's own :class:`~qexplorer.core.domain.events.Phase` names). Each phase
costs ``units × seconds per unit``; the units come from the model and the job (GiB of weights, billions of
parameter-tokens for a forward pass over the evaluation text, tokens timed in the benchmark), the rate from
the jobs that already ran on this machine (``durations.json`` in the data dir: the median of the last
:data:`KEEP` rates per phase and engine) or, where none has, from :data:`DEFAULT_RATES` - measured on the
2-core AVX2 development machine, so an estimate made from them says so ("defaults").

Work that is cached costs nothing: the BF16 checkpoint a GGUF model is dequantized to, the quality reference,
an artifact made by an earlier job. In a queue the first job that needs one of them pays for it, the others
do not. After each job :meth:`DurationBook.record` stores what each phase cost per unit, and the predicted
beside the actual duration, so the next estimate starts from this machine's numbers.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qexplorer.core.domain.phases import PHASES, EtaUnit, PhaseKind
from qexplorer.core.kinds import Engine, ModelFormat, Producer
from qexplorer.core.model import ModelSpec
from qexplorer.core.precisions import BY_KEY, Precision
from qexplorer.core.units import GIB

KEEP = 5
PP_FACTOR = 6.0  # a prompt token costs about a sixth of a generated one (pp512 ≈ 4-6 × tg128's t/s here)
# Seconds per unit on the 2-core AVX2 development machine: the medians of the default ladder run cold and warm
# (scripts/bench_jobs.py decision, SmolLM2-135M, 2026-12-02). Marked "guess" where that run had no such phase.


def rate_key(phase: PhaseKind, *qualifiers: str) -> str:
    """The key a rate is learned under: the phase, and what makes its cost differ (the engine, the producer)."""
    return ":".join([str(phase), *qualifiers])


# Each rate is seconds per the phase's unit (phases.PHASES[...].eta_unit).
DEFAULT_RATES: dict[str, float] = {
    # the worker's interpreter, imports, resolving the model, hashing a cached artifact
    rate_key(PhaseKind.START): 3.3,
    rate_key(PhaseKind.DEQUANTIZE): 136.0,  # a GGUF model to the BF16 checkpoint, once
    rate_key(PhaseKind.REFERENCE): 0.021,  # the BF16 forward pass over the evaluation text, once
    rate_key(PhaseKind.CONVERT): 60.0,  # guess (llama.cpp's convert_hf_to_gguf.py)
    rate_key(PhaseKind.QUANTIZE, "llama.cpp quantize"): 10.0,
    rate_key(PhaseKind.QUANTIZE, "cast"): 10.0,  # guess
    rate_key(PhaseKind.QUANTIZE, "llm-compressor"): 30.0,
    rate_key(PhaseKind.QUANTIZE, "llm-compressor", "calibrated"): 300.0,  # guess: GPTQ / AWQ calibration
    rate_key(PhaseKind.ENGINE, "vllm"): 41.0,  # eager mode on 2 cores
    rate_key(PhaseKind.LOAD, "llama.cpp"): 1.4,
    rate_key(PhaseKind.LOAD, "transformers"): 10.0,  # guess, like the quality pass's load below
    rate_key(PhaseKind.LOAD, "vllm"): 10.0,  # the artifact's own quality pass loads it in transformers
    rate_key(PhaseKind.BENCHMARK, "llama.cpp"): 0.12,
    rate_key(PhaseKind.BENCHMARK, "vllm"): 0.14,
    rate_key(PhaseKind.BENCHMARK, "transformers"): 0.3,  # guess: eager PyTorch, about half vLLM-CPU's speed
    rate_key(PhaseKind.QUALITY, "llama.cpp"): 0.039,
    rate_key(PhaseKind.LOG_PROBS, "vllm"): 0.025,  # vLLM's prompt log-probs on the reference's chunks
    rate_key(PhaseKind.QUALITY, "transformers"): 0.015,  # the artifact's own pass (beside vLLM, or the fallback)
    rate_key(PhaseKind.CALIBRATE): 1.3,  # the bandwidth test (cached per CPU after the first quiet one)
}


@dataclass(frozen=True)
class PhaseEstimate:
    name: str  # the worker's phase name
    key: str  # the rate it uses
    units: float
    seconds: float
    measured: bool  # the rate comes from jobs that ran here (else the defaults)


@dataclass(frozen=True)
class JobEstimate:
    precision: str
    phases: tuple[PhaseEstimate, ...]

    @property
    def total_s(self) -> float:
        return sum(p.seconds for p in self.phases)

    @property
    def source(self) -> str:
        """How the estimate was made, to follow "estimated": "from jobs that ran here", "from defaults", ..."""
        measured = sum(p.measured for p in self.phases)
        if measured == len(self.phases):
            return "from jobs that ran on this machine"
        return "from another machine's defaults" if not measured else "partly from defaults"

    def left_s(self, phase: str, phase_elapsed_s: float) -> float:
        """Time left while ``phase`` has run for ``phase_elapsed_s``: the rest of it (never below zero) and every
        later phase. A phase the estimate did not expect counts as the start of the job."""
        names = [p.name for p in self.phases]
        if phase not in names:
            return self.total_s
        index = names.index(phase)
        return max(0.0, self.phases[index].seconds - phase_elapsed_s) + sum(p.seconds for p in
                                                                            self.phases[index + 1:])


def engine_for(precision: Precision, cuda: bool, vllm_found: bool) -> str:
    if precision.is_gguf:
        return str(Engine.LLAMA_CPP)
    if not vllm_found or (not cuda and precision.vllm_cpu_gap):
        return str(Engine.TRANSFORMERS)
    return str(Engine.VLLM)


@dataclass(frozen=True)
class Cached:
    """What is already on disk before the queue starts (each found once is free for every job)."""

    bf16_checkpoint: bool
    reference: bool
    bf16_gguf: bool
    artifacts: frozenset[str]  # precision keys whose artifact exists


def cached_state(spec: ModelSpec, work_dir: Path, reference: bool) -> Cached:
    """What the producers would find and reuse, by their own paths and completeness checks."""
    from qexplorer.core.quantize.gguf_quant import BF16_GGUF, gguf_path
    from qexplorer.core.quantize.torch_quant import BF16_CHECKPOINT, artifact_dir, saved_folder

    bf16 = spec.format == ModelFormat.HF or saved_folder(work_dir / BF16_CHECKPOINT)
    artifacts = {key for key, precision in BY_KEY.items()
                 if (gguf_path(precision, work_dir).exists() if precision.is_gguf
                     else bf16 if precision.producer == Producer.CAST and key == "bf16"
                     else saved_folder(artifact_dir(precision, work_dir)))}
    return Cached(bf16_checkpoint=bf16, reference=reference, bf16_gguf=(work_dir / BF16_GGUF).exists(),
                  artifacts=frozenset(artifacts))


def _quantizes(precision: Precision) -> bool:
    """Whether making the artifact is a quantization step (BF16 is the dequantized checkpoint itself)."""
    return not (precision.producer == Producer.CAST and precision.key == "bf16")


def job_phases(spec: ModelSpec, precision: Precision, job: Any, engine: str,
               cached: Cached) -> tuple[list[tuple[PhaseKind, str, float]], Cached]:
    """(phase, rate key, units) in the order the worker runs them, and what is cached after this job. Each
    phase's units are its :class:`~qexplorer.core.domain.phases.EtaUnit`; a forward pass counts the *active*
    parameters (a MoE reads only its routed experts), the benchmark the active share of the artifact."""
    from qexplorer.core.planner import active_weight_fraction, weight_bytes

    bench = job.bench
    timed = bench.repetitions * sum(bench.gen_tokens + (bench.prompt_tokens + depth) / PP_FACTOR
                                    for depth in bench.depths)
    if bench.warmup:  # llama-bench's: the first depth's prompt and one token
        timed += 1 + (bench.prompt_tokens + bench.depths[0]) / PP_FACTOR
    artifact_gib = weight_bytes(spec, precision) / GIB
    units = {EtaUnit.JOB: 1.0, EtaUnit.BF16_GIB: weight_bytes(spec, BY_KEY["bf16"]) / GIB,
             EtaUnit.ARTIFACT_GIB: artifact_gib,
             EtaUnit.PARAM_TOKENS: (spec.active_params or 0) * job.quality_tokens / 1e9,
             EtaUnit.GIB_TOKENS: timed * artifact_gib * active_weight_fraction(spec, precision)}
    phases: list[tuple[PhaseKind, str, float]] = []

    def add(phase: PhaseKind, *qualifiers: str) -> None:
        phases.append((phase, rate_key(phase, *qualifiers), units[PHASES[phase].eta_unit]))

    add(PhaseKind.START)
    needs_bf16 = not precision.is_gguf or job.quality or spec.format == ModelFormat.HF
    if needs_bf16 and spec.format == ModelFormat.GGUF and not cached.bf16_checkpoint:
        add(PhaseKind.DEQUANTIZE)
    if job.quality and not cached.reference:
        add(PhaseKind.REFERENCE)
    if precision.key not in cached.artifacts:
        if precision.is_gguf and spec.format == ModelFormat.HF and not cached.bf16_gguf:
            add(PhaseKind.CONVERT)
        if _quantizes(precision):
            add(PhaseKind.QUANTIZE, str(precision.producer), *(["calibrated"] if precision.needs_calibration else []))
    is_reference = precision.key == job.reference_precision and not precision.is_gguf
    if engine == str(Engine.VLLM):  # the artifact's own pass first (untimed preparation), then vLLM
        if job.quality and not is_reference:
            add(PhaseKind.LOAD, engine)
            add(PhaseKind.QUALITY, str(Engine.TRANSFORMERS))
        add(PhaseKind.ENGINE, engine)
    else:
        add(PhaseKind.LOAD, engine)
    add(PhaseKind.BENCHMARK, engine)
    if job.quality and engine == str(Engine.VLLM):  # vLLM's own log-probs, its cross-check
        add(PhaseKind.LOG_PROBS, engine)
    elif job.quality and not is_reference:
        add(PhaseKind.QUALITY, engine)
    add(PhaseKind.CALIBRATE)
    after = Cached(bf16_checkpoint=cached.bf16_checkpoint or needs_bf16, reference=cached.reference or job.quality,
                   bf16_gguf=cached.bf16_gguf or (precision.is_gguf and spec.format == ModelFormat.HF),
                   artifacts=cached.artifacts | {precision.key})
    return phases, after


class DurationBook:
    """``durations.json``: the recent seconds per unit of every phase, and predicted vs actual per job."""

    def __init__(self, path: Path, machine: str | None = None) -> None:
        self.path = path
        self._machine = machine
        self._data = self._load()

    @property
    def machine(self) -> str:
        """The machine rates are learned for (core.machine), read only when a rate is (NVML, /proc/cpuinfo)."""
        if self._machine is None:
            from qexplorer.core.machine import machine_key

            self._machine = machine_key()
        return self._machine

    @staticmethod
    def in_dir(data_dir: Path | str, machine: str | None = None) -> DurationBook:
        return DurationBook(Path(data_dir) / "durations.json", machine)

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                machines = data.get("machines")
                if not isinstance(machines, dict):
                    # a file from before rates were kept per machine: its rates were learned where it lives
                    legacy = data.get("rates")
                    machines = {self.machine: {"rates": legacy}} if isinstance(legacy, dict) and legacy else {}
                data["machines"] = {k: v for k, v in machines.items()
                                    if isinstance(v, dict) and isinstance(v.get("rates"), dict)}
                data.pop("rates", None)
                data.setdefault("jobs", [])
                return data
        except (OSError, ValueError):
            pass  # none yet, or unreadable: start again from the defaults
        return {"machines": {}, "jobs": []}

    def _rates(self) -> dict[str, list[Any]]:
        """This machine's learned rates (created on first write)."""
        return self._data["machines"].setdefault(self.machine, {"rates": {}})["rates"]

    def rate(self, key: str) -> tuple[float, bool]:
        entry = self._data["machines"].get(self.machine) or {}
        seen = [float(v) for v in (entry.get("rates") or {}).get(key, []) if isinstance(v, (int, float)) and v >= 0]
        if seen:
            return statistics.median(seen[-KEEP:]), True
        return DEFAULT_RATES.get(key, 1.0), False

    def learned_bytes(self, key: str, device: str) -> int | None:
        """The median of a memory figure learned on this device (e.g. vLLM's overhead on a GB10), None: none yet."""
        seen = [v for v in self._data.get("bytes", {}).get(f"{key}:{device}", []) if isinstance(v, int) and v > 0]
        return int(statistics.median(seen[-KEEP:])) if seen else None

    def learn_bytes(self, key: str, device: str, value: int) -> None:
        """Keep one measured memory figure for ``learned_bytes`` (under the same lock as ``record``)."""
        from qexplorer.core.artifacts import file_lock

        with file_lock(self.path.with_name(self.path.name + ".lock")):
            self._data = self._load()
            figures = self._data.setdefault("bytes", {})
            figures[f"{key}:{device}"] = (figures.get(f"{key}:{device}", []) + [int(value)])[-KEEP:]
            self._write()

    def jobs(self) -> list[dict[str, Any]]:
        return list(self._data.get("jobs", []))

    def record(self, estimate: JobEstimate, actual: Iterable[tuple[str, float]],
               skip: Iterable[str] = ()) -> None:
        """What each phase of a finished job cost, against its estimate. Phases in ``skip`` (they ran beside
        another job, slowed by it) are kept in the job's entry but teach no rate. Read, changed and rewritten
        under a file lock: the app's job threads and a CLI run may record at once."""
        from qexplorer.core.artifacts import file_lock

        actual = list(actual)
        spent: dict[str, float] = {}
        for name, seconds in actual:
            spent[name] = spent.get(name, 0.0) + seconds
        expected: dict[str, list[PhaseEstimate]] = {}
        for phase in estimate.phases:
            expected.setdefault(phase.name, []).append(phase)
        skipped = set(skip)
        learned: list[tuple[str, float]] = []
        for name, seconds in spent.items():
            parts = None if name in skipped else expected.get(name)
            units = sum(p.units for p in parts) if parts else 0.0
            if not parts or units <= 0:
                continue
            # a phase name that two estimates share (load + the quality pass's load) splits by their units
            learned.extend((part.key, seconds / units) for part in parts)
        entry = {"precision": estimate.precision, "machine": self.machine, "predicted_s": round(estimate.total_s, 1),
                 "actual_s": round(sum(s for _, s in actual), 1), "source": estimate.source, "at": int(time.time()),
                 "phases": [[name, round(seconds, 2)] for name, seconds in actual]}
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            self._data = self._load()
            rates = self._rates()
            for key, rate in learned:
                rates[key] = (rates.get(key, []) + [rate])[-KEEP:]
            self._data["jobs"] = (self._data.get("jobs", []) + [entry])[-200:]
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.partial")
        tmp.write_text(json.dumps(self._data, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)


def estimate_jobs(spec: ModelSpec, jobs: Sequence[Any], data_dir: Path | str, *, cuda: bool = False,
                  vllm_found: bool | None = None, book: DurationBook | None = None) -> tuple[JobEstimate, ...]:
    """One estimate per job, in queue order: a job does not pay for what an earlier one leaves cached."""
    from qexplorer.core.artifacts import model_key

    if not jobs:
        return ()
    if vllm_found is None:
        from qexplorer.core.engines.vllm import find_vllm

        vllm_found = find_vllm() is not None
    book = book or DurationBook.in_dir(data_dir)
    work_dir = Path(data_dir) / "artifacts" / model_key(spec)  # model_work_dir's path, without creating it
    first = jobs[0]
    reference = False
    if first.quality:
        from qexplorer.core.quality import reference_cached

        reference = reference_cached(Path(data_dir), model_key(spec), first.quality_corpus,
                                     first.reference_precision, first.quality_ctx, first.quality_tokens, first.top_k)
    cached = cached_state(spec, work_dir, reference)
    estimates = []
    for job in jobs:
        precision = BY_KEY[job.precision]
        phases, cached = job_phases(spec, precision, job, engine_for(precision, cuda, vllm_found), cached)
        parts = []
        for name, key, units in phases:
            rate, measured = book.rate(key)
            parts.append(PhaseEstimate(name, key, units, units * rate, measured))
        estimates.append(JobEstimate(job.precision, tuple(parts)))
    return tuple(estimates)


def cost_order(spec: ModelSpec, precisions: Sequence[Precision]) -> list[Precision]:
    """Cheapest informative jobs first (FACTS: GGUF re-quantizations and data-free schemes before calibrated
    methods), the given order kept within each class."""

    def rank(precision: Precision) -> int:
        if precision.is_gguf:
            return 0 if spec.format == ModelFormat.GGUF else 1
        if precision.needs_calibration:
            return 3
        return 2

    return sorted(precisions, key=rank)


def start_order(spec: ModelSpec, precisions: Sequence[Precision]) -> list[Precision]:
    """The order jobs start in when they overlap (jobs.overlap): the cheapest first, for the first answer; then
    those with the longest preparation (a quantization and a vLLM start before a plain vLLM start), so that it
    hides behind other jobs' measurements; then the cheap re-quantizations, measured as soon as the CPU is free;
    calibrated methods last, as in :func:`cost_order`."""
    ordered = cost_order(spec, precisions)
    if len(ordered) < 3:
        return ordered

    def preparation(precision: Precision) -> tuple[bool, bool, bool]:
        return precision.needs_calibration, precision.is_gguf, not _quantizes(precision)

    return [ordered[0], *sorted(ordered[1:], key=preparation)]


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}:{seconds % 60:02d}"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
