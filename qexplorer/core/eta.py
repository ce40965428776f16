"""How long a job will take, before it runs, and how long it took: the ETA on the plan and jobs screens.

A job is a sequence of phases (the worker's own :class:`~qexplorer.core.domain.events.Phase` names). Each phase
costs ``fixed_s + per_unit_s × units`` (:class:`Cost`); the units come from the model and the job (GiB of
weights, billions of active parameter-tokens for a forward pass over the evaluation text, GiB-tokens timed in
the benchmark). :data:`DEFAULT_COSTS` were fitted on one machine (``scripts/bench_jobs.py fit`` over the scale
benchmark's points: the fit and its points are in the README); a fixed part matters, because at the sizes
measured here imports, engine starts and file handling still dominate, and a cost per unit alone fitted on a
small model is many times too long for a large one.

On this machine each phase's cost is the default times a factor: the median of what jobs that ran here took
against that default (``durations.json`` in the data dir, per machine: :mod:`qexplorer.core.machine`), or, before
any has, the machine's calibration (:mod:`qexplorer.core.calibration`: a few seconds on first use) against the
reference machine's, for the kind of work the phase is. Neither: the defaults as they are, labelled "another
machine's defaults". On a GPU (:func:`projected_costs`) the costs are projected from the device's published
bandwidth and the GB10 figures in FACTS §3 and §9, each with what it rests on, labelled "projected".

Work that is cached costs nothing: the BF16 checkpoint a GGUF model is dequantized to, the quality reference,
an artifact made by an earlier job. In a queue the first job that needs one of them pays for it, the others
do not. After each job :meth:`DurationBook.record` stores, per phase, what it cost against its default, and the
predicted beside the actual duration.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from qexplorer.core.calibration import Bound, Calibration
from qexplorer.core.domain.phases import PHASES, EtaUnit, PhaseKind
from qexplorer.core.kinds import Engine, ModelFormat, Producer
from qexplorer.core.model import ModelSpec
from qexplorer.core.precisions import BY_KEY, Precision
from qexplorer.core.units import GIB

KEEP = 5


def rate_key(phase: PhaseKind, *qualifiers: str) -> str:
    """The key a cost is kept under: the phase, and what makes its cost differ (the engine, the producer)."""
    return ":".join([str(phase), *qualifiers])


@dataclass(frozen=True)
class Cost:
    """A phase's seconds at the reference machine's speed: ``fixed_s + per_unit_s × units``."""

    fixed_s: float
    per_unit_s: float
    bound: Bound  # what it moves with from one machine to another
    basis: str = ""  # what a projected figure rests on (said beside it)

    def seconds(self, units: float) -> float:
        return self.fixed_s + self.per_unit_s * units


@dataclass(frozen=True)
class CostModel:
    costs: dict[str, Cost]
    pp_factor: float  # a prompt token costs 1/pp_factor of a generated one in the benchmark's units
    reference: Calibration | None  # the machine the costs were fitted on (None: projected, not fitted)
    label: str  # how an estimate from these costs alone is described


class Source(StrEnum):
    """Where one phase's figure comes from (the estimate's label says it in words)."""

    MEASURED = "measured here"  # jobs that ran on this machine
    CALIBRATED = "calibrated"  # the defaults scaled by this machine's calibration
    DEFAULTS = "defaults"  # the reference machine's defaults as they are
    PROJECTED = "projected"  # from a device's published figures


# The reference machine: a 2-core AMD EPYC with AVX-512 (the development VM, 2026-12-03), as
# `measure_in_child(2)` measured it while idle (the median of three runs).
REFERENCE_CALIBRATION = Calibration(python_mops=44.6, bf16_gflops=411.0, fp32_gflops=192.0, copy_gbs=28.2,
                                    threads=2)

_P, _B, _F, _C = Bound.PYTHON, Bound.BF16, Bound.FP32, Bound.COPY
TASKS_FIXED_S = 5.0  # the task pass's fixed part (see DEFAULT_COSTS)
LOAD_SWEEP_FIXED_S = 5.0  # the load sweep's: a server started (llama-server), the prompt-length calibration
# Fitted (scripts/bench_jobs.py fit) on the reference machine: the default ladder (Q8_0, Q4_K_M, BF16, INT8) with
# quality, cold, on the bundled model and random-weight models of 0.19, 0.42, 1.07 B and a 0.99 B MoE (0.20 B
# active) - 2026-12-03, the README's scale table. Each is (fixed s, s per unit, bound).
DEFAULT_COSTS: dict[str, Cost] = {
    # the worker's interpreter, imports, resolving the model; a user's own BF16 folder is hashed once
    rate_key(PhaseKind.START): Cost(1.9, 0.0, _P),
    rate_key(PhaseKind.START, "hash"): Cost(3.2, 3.94, _P),
    # a GGUF model to the BF16 checkpoint, once: measured at one size only (24.5 s for 0.25 GiB), so its
    # imports' few seconds are fixed and the rest counted per GiB
    rate_key(PhaseKind.DEQUANTIZE): Cost(3.0, 86.0, _F),
    rate_key(PhaseKind.REFERENCE): Cost(6.9, 0.00706, _B),  # the BF16 forward pass over the evaluation text, once
    rate_key(PhaseKind.CONVERT): Cost(4.4, 7.84, _F),  # llama.cpp's convert_hf_to_gguf.py
    rate_key(PhaseKind.QUANTIZE, "llama.cpp quantize"): Cost(0.0, 3.51, _F),
    rate_key(PhaseKind.QUANTIZE, "llama.cpp quantize", "k-quant"): Cost(0.0, 19.7, _F),  # a K-quant searches scales
    rate_key(PhaseKind.QUANTIZE, "cast"): Cost(2.0, 6.4, _B),  # not measured: like llm-compressor's data-free pass
    rate_key(PhaseKind.QUANTIZE, "llm-compressor"): Cost(6.1, 6.42, _B),
    # not measured (a calibrated pass on 2 cores takes too long for the scale run): ten times the data-free pass
    rate_key(PhaseKind.QUANTIZE, "llm-compressor", "calibrated"): Cost(60.0, 64.0, _B),
    rate_key(PhaseKind.ENGINE, "vllm"): Cost(36.3, 8.88, _P),  # eager mode on 2 cores, then the weights
    rate_key(PhaseKind.LOAD, "llama.cpp"): Cost(0.27, 0.077, _F),
    rate_key(PhaseKind.LOAD, "transformers"): Cost(0.74, 0.0, _B),  # not measured: like the quality pass's load
    rate_key(PhaseKind.LOAD, "vllm"): Cost(0.74, 0.0, _B),  # the artifact's own quality pass loads it in transformers
    rate_key(PhaseKind.BENCHMARK, "llama.cpp"): Cost(0.54, 0.0637, _F),
    rate_key(PhaseKind.BENCHMARK, "vllm"): Cost(0.52, 0.0638, _B),
    rate_key(PhaseKind.BENCHMARK, "transformers"): Cost(0.5, 0.13, _B),  # not measured: about half vLLM-CPU's speed
    # the task pass: units are the most tokens it may generate × active GiB (answers stop early: the rate absorbs
    # it). Measured 2026-12-03 on the bundled model, the full pass (--quick --tasks humaneval,arith: 164 + 160
    # items, its chat template): Q4_K_M in llama.cpp 478.5 s for 6,417 units, alone; BF16 in vLLM 347.8 s for
    # 17,062 units, its requests batched 8 at a time, beside another job's work (an upper bound). With 24 items
    # of each the rates were 0.055 and 0.014: the later HumanEval problems draw longer answers. One point each:
    # the fixed part (the sandbox probe, a context of its own, scoring programs two at a time) is assumed
    rate_key(PhaseKind.TASKS, "llama.cpp"): Cost(TASKS_FIXED_S, 0.072, _F),
    rate_key(PhaseKind.TASKS, "vllm"): Cost(TASKS_FIXED_S, 0.020, _B),
    # not measured: generate() one prompt at a time in eager PyTorch, taken as twice llama.cpp's
    rate_key(PhaseKind.TASKS, "transformers"): Cost(TASKS_FIXED_S, 0.144, _B),
    # the load sweep: units are every token it has the server process (each stream counted, prompt tokens ÷ the
    # prefill factor) × active GiB. Measured 2026-12-04 on the bundled model (--load 1,2,4,8, 256-token prompts,
    # 64 out, 2 rounds, --quick): vLLM-CPU INT8 29.3 s and BF16 39.1 s for all four levels, about 0.6 of the
    # benchmark's rate (batched streams share a decode step); llama-server Q4_K_M 9.5 s for the two levels it ran
    # before saturation stopped it, the benchmark's rate. llama-server's start is the fixed part
    rate_key(PhaseKind.LOAD_SWEEP, "llama.cpp"): Cost(LOAD_SWEEP_FIXED_S, 0.0637, _F),
    rate_key(PhaseKind.LOAD_SWEEP, "vllm"): Cost(LOAD_SWEEP_FIXED_S, 0.038, _B),
    rate_key(PhaseKind.QUALITY, "llama.cpp"): Cost(4.6, 0.0149, _F),
    rate_key(PhaseKind.LOG_PROBS, "vllm"): Cost(7.3, 0.0100, _B),  # vLLM's prompt log-probs on the reference's chunks
    rate_key(PhaseKind.QUALITY, "transformers"): Cost(1.1, 0.0176, _B),  # the artifact's own pass
    rate_key(PhaseKind.CALIBRATE): Cost(1.3, 0.0, _C),  # the bandwidth test (cached per CPU after a quiet one)
}
CPU_COSTS = CostModel(DEFAULT_COSTS, pp_factor=6.0,  # pp512 ≈ 4-6 × tg128's t/s on these CPUs
                      reference=REFERENCE_CALIBRATION, label="another machine's defaults")
UNKNOWN = Cost(0.0, 1.0, _P)

# A GPU's projection (FACTS §3, §9). What cannot be read from a published figure is an assumption, said so.
DISK_BYTES_S = 3e9  # assumed: weights read from an NVMe SSD (page-cached re-reads are faster)
VLLM_START_S = 60.0  # assumed: vLLM's start beside its weights (compile cache warm, one graph size captured)
DEVICE_FIGURES = {  # decode's share of the bandwidth bound, prompt-to-generated speed, prefill param-tokens/s
    "vllm": (35 * 3.3e9 / 273e9, "the seed's 35 tok/s for Qwen3-Coder-30B-A3B FP8 on a GB10 (FACTS §3): "
                                  "{:.0%} of 273 GB/s"),
    "llama.cpp": (60.9 * 3.3e9 * 1.0625 / 273e9, "llama.cpp's DGX Spark table, Qwen3-Coder-30B-A3B Q8_0 tg32 "
                                                 "60.9 t/s (FACTS §9): {:.0%} of 273 GB/s"),
}
DEVICE_PP_FACTOR = 3175.6 / 60.9  # the same table's pp2048 / tg32 on a GB10
PREFILL_PARAM_TOKENS_S = 3175.6 * 3.3e9  # the same table's pp2048 on ~3.3 B active parameters


def projected_costs(spec: ModelSpec, device: str, bandwidth_bytes_s: float) -> CostModel:
    """Costs on a GPU with this published bandwidth, for this model (the weights it reads from disk are part of
    the fixed costs). Host work (the worker's start, dequantizing, the converter, llama-quantize) keeps the
    reference CPU's fitted costs: its basis says so."""
    from qexplorer.core.planner import weight_bytes

    bf16_bytes = weight_bytes(spec, BY_KEY["bf16"])
    host = "the reference 2-core CPU's fitted cost (host work; a GB10's 20 cores are faster)"
    read_bf16 = bf16_bytes / DISK_BYTES_S
    disk = f"weights read at {DISK_BYTES_S / 1e9:.0f} GB/s (assumed NVMe)"
    prefill = (f"llama.cpp's prefill on a GB10, {PREFILL_PARAM_TOKENS_S / 1e12:.1f} T active parameter-tokens/s "
               "(FACTS §9; transformers is slower: a lower bound)")
    a100 = ("llm-compressor's reference for Llama-3-8B on an A100 ({}; PR 2029), scaled by memory bandwidth "
            "273 / 2039 GB/s")
    per_gib_a100 = {"data-free": 60.0 / 15.0, "calibrated": 1800.0 / 15.0}  # 8 B BF16 ≈ 15 GiB
    host_keys = {rate_key(PhaseKind.START), rate_key(PhaseKind.START, "hash"), rate_key(PhaseKind.DEQUANTIZE),
                 rate_key(PhaseKind.CONVERT), rate_key(PhaseKind.QUANTIZE, str(Producer.LLAMA_QUANTIZE)),
                 rate_key(PhaseKind.QUANTIZE, str(Producer.LLAMA_QUANTIZE), "k-quant"),
                 rate_key(PhaseKind.QUANTIZE, str(Producer.CAST)), rate_key(PhaseKind.CALIBRATE)}
    costs = {key: replace(DEFAULT_COSTS[key], basis=host) for key in host_keys}
    device_bound = Bound.DEVICE
    costs[rate_key(PhaseKind.REFERENCE)] = Cost(read_bf16, 1e9 / PREFILL_PARAM_TOKENS_S, device_bound,
                                                f"{prefill}; {disk}")
    for key in (rate_key(PhaseKind.QUALITY, "transformers"), rate_key(PhaseKind.LOG_PROBS, "vllm"),
                rate_key(PhaseKind.QUALITY, "llama.cpp")):
        costs[key] = Cost(0.0, 1e9 / PREFILL_PARAM_TOKENS_S, device_bound, prefill)
    for kind, qualifiers in (("data-free", ()), ("calibrated", ("calibrated",))):
        costs[rate_key(PhaseKind.QUANTIZE, "llm-compressor", *qualifiers)] = Cost(
            0.0, per_gib_a100[kind] * 2039e9 / bandwidth_bytes_s, device_bound,
            a100.format("about 1 min for RTN" if kind == "data-free" else "about 30 min for GPTQ or AWQ"))
    for engine in ("llama.cpp", "transformers", "vllm"):
        costs[rate_key(PhaseKind.LOAD, engine)] = Cost(0.0, GIB / DISK_BYTES_S, device_bound, disk)
    costs[rate_key(PhaseKind.ENGINE, "vllm")] = Cost(VLLM_START_S, GIB / DISK_BYTES_S, device_bound,
                                                     f"assumed {VLLM_START_S:.0f} s to start; {disk}")
    for engine in ("vllm", "llama.cpp", "transformers"):
        share, basis = DEVICE_FIGURES["llama.cpp" if engine == "llama.cpp" else "vllm"]
        costs[rate_key(PhaseKind.BENCHMARK, engine)] = Cost(0.0, GIB / (share * bandwidth_bytes_s), device_bound,
                                                             basis.format(share))
        # one stream's decode rate: a lower bound's worth of speed, since vLLM batches the pass's requests
        costs[rate_key(PhaseKind.TASKS, engine)] = Cost(TASKS_FIXED_S, GIB / (share * bandwidth_bytes_s),
                                                        device_bound, basis.format(share))
        costs[rate_key(PhaseKind.LOAD_SWEEP, engine)] = Cost(LOAD_SWEEP_FIXED_S, GIB / (share * bandwidth_bytes_s),
                                                             device_bound, basis.format(share))
    return CostModel(costs, pp_factor=DEVICE_PP_FACTOR, reference=None,
                     label=f"as a projection for {device} from published figures")


@dataclass(frozen=True)
class PhaseEstimate:
    name: str  # the worker's phase name
    key: str  # the cost it uses
    units: float
    seconds: float
    source: Source = Source.DEFAULTS
    base_s: float = 0.0  # the default (or projected) cost before this machine's factor
    basis: str = ""  # what a projected figure rests on

    @property
    def measured(self) -> bool:
        return self.source == Source.MEASURED


@dataclass(frozen=True)
class JobEstimate:
    precision: str
    phases: tuple[PhaseEstimate, ...]
    label: str = CPU_COSTS.label  # the cost model's words for its defaults
    first_pass: bool = False  # the estimate of a quick first-answer job (JobSpec.first_pass)

    @property
    def total_s(self) -> float:
        return sum(p.seconds for p in self.phases)

    @property
    def source(self) -> str:
        """How the estimate was made, to follow "estimated": "from jobs that ran here", "from defaults", ..."""
        sources = {p.source for p in self.phases}
        if sources == {Source.MEASURED}:
            return "from jobs that ran on this machine"
        if Source.MEASURED in sources:
            return "partly from jobs that ran on this machine"
        if Source.PROJECTED in sources:
            return self.label  # "as a projection for ..."
        if Source.CALIBRATED in sources:
            return "from defaults scaled by this machine's calibration"
        return f"from {self.label}"

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
    references: frozenset[int]  # the quality references on disk, by their token count
    source_hashed: bool  # the user's own BF16 folder (the bf16 artifact) has its SHA-256 kept already
    bf16_gguf: bool
    artifacts: frozenset[str]  # precision keys whose artifact exists


def cached_state(spec: ModelSpec, work_dir: Path, references: frozenset[int]) -> Cached:
    """What the producers would find and reuse, by their own paths and completeness checks."""
    from qexplorer.core.quantize.gguf_quant import BF16_GGUF, gguf_path
    from qexplorer.core.quantize.torch_quant import BF16_CHECKPOINT, artifact_dir, saved_folder

    bf16 = spec.format == ModelFormat.HF or saved_folder(work_dir / BF16_CHECKPOINT)
    artifacts = {key for key, precision in BY_KEY.items()
                 if (gguf_path(precision, work_dir).exists() if precision.is_gguf
                     else bf16 if precision.producer == Producer.CAST and key == "bf16"
                     else saved_folder(artifact_dir(precision, work_dir)))}
    from qexplorer.core.artifacts import already_hashed

    hashed = spec.format != ModelFormat.HF or already_hashed(Path(spec.path), work_dir)
    return Cached(bf16_checkpoint=bf16, references=references, source_hashed=hashed, bf16_gguf=(work_dir / BF16_GGUF).exists(),
                  artifacts=frozenset(artifacts))


def _quantizes(precision: Precision) -> bool:
    """Whether making the artifact is a quantization step (BF16 is the dequantized checkpoint itself)."""
    return not (precision.producer == Producer.CAST and precision.key == "bf16")


def job_phases(spec: ModelSpec, precision: Precision, job: Any, engine: str, cached: Cached,
               pp_factor: float = CPU_COSTS.pp_factor) -> tuple[list[tuple[PhaseKind, str, float]], Cached]:
    """(phase, rate key, units) in the order the worker runs them, and what is cached after this job. Each
    phase's units are its :class:`~qexplorer.core.domain.phases.EtaUnit`; a forward pass counts the *active*
    parameters (a MoE reads only its routed experts), the benchmark the active share of the artifact."""
    from qexplorer.core.planner import active_weight_fraction, weight_bytes

    bench = job.bench
    timed = bench.repetitions * sum(bench.gen_tokens + (bench.prompt_tokens + depth) / pp_factor
                                    for depth in bench.depths)
    if bench.warmup:  # llama-bench's: the first depth's prompt and one token
        timed += 1 + (bench.prompt_tokens + bench.depths[0]) / pp_factor
    artifact_gib = weight_bytes(spec, precision) / GIB
    units = {EtaUnit.JOB: 1.0, EtaUnit.BF16_GIB: weight_bytes(spec, BY_KEY["bf16"]) / GIB,
             EtaUnit.ARTIFACT_GIB: artifact_gib,
             EtaUnit.PARAM_TOKENS: (spec.active_params or 0) * job.quality_tokens / 1e9,
             EtaUnit.GIB_TOKENS: timed * artifact_gib * active_weight_fraction(spec, precision),
             EtaUnit.TASK_GIB_TOKENS: _task_tokens(job) * artifact_gib * active_weight_fraction(spec, precision),
             EtaUnit.LOAD_GIB_TOKENS: (job.load.timed_tokens(pp_factor) if job.load else 0.0) * artifact_gib
             * active_weight_fraction(spec, precision)}
    phases: list[tuple[PhaseKind, str, float]] = []

    def add(phase: PhaseKind, *qualifiers: str) -> None:
        phases.append((phase, rate_key(phase, *qualifiers), units[PHASES[phase].eta_unit]))

    # the user's own BF16 folder is hashed by its first job (core.artifacts keeps the hash): seconds per GiB
    hashes = precision.key == "bf16" and spec.format == ModelFormat.HF and not cached.source_hashed
    add(PhaseKind.START, *(["hash"] if hashes else []))
    needs_bf16 = not precision.is_gguf or job.quality or spec.format == ModelFormat.HF
    if needs_bf16 and spec.format == ModelFormat.GGUF and not cached.bf16_checkpoint:
        add(PhaseKind.DEQUANTIZE)
    if job.quality and job.quality_tokens not in cached.references:
        add(PhaseKind.REFERENCE)
    if precision.key not in cached.artifacts:
        if precision.is_gguf and spec.format == ModelFormat.HF and not cached.bf16_gguf:
            add(PhaseKind.CONVERT)
        if _quantizes(precision):
            # a K-quant searches its scales: several times a Q8_0's cost per GiB (measured: 6.8 s against 1.2 s)
            kind = ("calibrated" if precision.needs_calibration else
                    "k-quant" if precision.is_gguf and "_k" in precision.key else None)
            add(PhaseKind.QUANTIZE, str(precision.producer), *([kind] if kind else []))
    is_reference = precision.key == job.reference_precision and not precision.is_gguf
    if engine == str(Engine.VLLM):  # the artifact's own pass first (untimed preparation), then vLLM
        if job.quality and not is_reference:
            add(PhaseKind.LOAD, engine)
            add(PhaseKind.QUALITY, str(Engine.TRANSFORMERS))
        add(PhaseKind.ENGINE, engine)
    else:
        add(PhaseKind.LOAD, engine)
    add(PhaseKind.BENCHMARK, engine)
    if job.tasks:
        add(PhaseKind.TASKS, engine)
    if job.load and engine != str(Engine.TRANSFORMERS):  # the fallback serves nothing: no sweep
        add(PhaseKind.LOAD_SWEEP, engine)
    if job.quality and engine == str(Engine.VLLM):  # vLLM's own log-probs, its cross-check
        add(PhaseKind.LOG_PROBS, engine)
    elif job.quality and not is_reference:
        add(PhaseKind.QUALITY, engine)
    add(PhaseKind.CALIBRATE)
    after = Cached(bf16_checkpoint=cached.bf16_checkpoint or needs_bf16, source_hashed=cached.source_hashed or hashes,
                   references=cached.references | ({job.quality_tokens} if job.quality else set()),
                   bf16_gguf=cached.bf16_gguf or (precision.is_gguf and spec.format == ModelFormat.HF),
                   artifacts=cached.artifacts | {precision.key})
    return phases, after


def _task_tokens(job: Any) -> int:
    """The most tokens a job's task pass may generate (0 without one)."""
    if not job.tasks:
        return 0
    from qexplorer.core.tasks.run import token_budget

    return token_budget(job)


class DurationBook:
    """``durations.json``: per machine, what each phase cost against its default (the factors the next estimate
    uses) and the machine's calibration; predicted vs actual per job."""

    def __init__(self, path: Path, machine: str | None = None) -> None:
        self.path = path
        self._machine = machine
        self._data = self._load()

    @property
    def machine(self) -> str:
        """The machine costs are learned for (core.machine), read only when one is (NVML, /proc/cpuinfo)."""
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
                # seconds per unit from before the costs had a fixed part mean nothing against today's defaults:
                # a file from then keeps its jobs' history and learns its factors again
                data.pop("rates", None)
                machines = data.get("machines")
                data["machines"] = {k: v for k, v in machines.items() if isinstance(v, dict)} \
                    if isinstance(machines, dict) else {}
                data.setdefault("jobs", [])
                return data
        except (OSError, ValueError):
            pass  # none yet, or unreadable: start again from the defaults
        return {"machines": {}, "jobs": []}

    def _entry(self) -> dict[str, Any]:
        return self._data["machines"].get(self.machine) or {}

    def factor(self, key: str) -> float | None:
        """The median of what this phase cost on this machine against its default, None: never measured here."""
        factors = self._entry().get("factors")
        seen = [float(v) for v in (factors.get(key, []) if isinstance(factors, dict) else [])
                if isinstance(v, (int, float)) and v > 0]
        return statistics.median(seen[-KEEP:]) if seen else None

    def calibration(self) -> Calibration | None:
        return Calibration.from_json(self._entry().get("calibration"))

    def _change(self, change: Any) -> None:
        """Read, change and rewrite under a file lock: the app's job threads and a CLI run may write at once."""
        from qexplorer.core.artifacts import file_lock

        with file_lock(self.path.with_name(self.path.name + ".lock")):
            self._data = self._load()
            change(self._data)
            self._write()

    def keep_calibration(self, calibration: Calibration) -> None:
        self._change(lambda data: data["machines"].setdefault(self.machine, {}).__setitem__(
            "calibration", calibration.to_json()))

    def learned_bytes(self, key: str, device: str) -> int | None:
        """The median of a memory figure learned on this device (e.g. vLLM's overhead on a GB10), None: none yet."""
        seen = [v for v in self._data.get("bytes", {}).get(f"{key}:{device}", []) if isinstance(v, int) and v > 0]
        return int(statistics.median(seen[-KEEP:])) if seen else None

    def learn_bytes(self, key: str, device: str, value: int) -> None:
        """Keep one measured memory figure for ``learned_bytes``."""

        def add(data: dict[str, Any]) -> None:
            figures = data.setdefault("bytes", {})
            figures[f"{key}:{device}"] = (figures.get(f"{key}:{device}", []) + [int(value)])[-KEEP:]

        self._change(add)

    def jobs(self) -> list[dict[str, Any]]:
        return list(self._data.get("jobs", []))

    def record(self, estimate: JobEstimate, actual: Iterable[tuple[str, float]],
               skip: Iterable[str] = ()) -> None:
        """What each phase of a finished job cost against its default. Phases in ``skip`` (they ran beside
        another job, slowed by it) are kept in the job's entry but teach nothing."""
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
            base = sum(p.base_s for p in parts) if parts else 0.0
            if not parts or base <= 0:
                continue
            # a phase name that two estimates share (load + the quality pass's load) teaches both the same factor
            learned.extend((part.key, seconds / base) for part in parts)
        entry = {"precision": estimate.precision, "first_pass": estimate.first_pass, "machine": self.machine, "predicted_s": round(estimate.total_s, 1),
                 "actual_s": round(sum(s for _, s in actual), 1), "source": estimate.source, "at": int(time.time()),
                 "phases": [[name, round(seconds, 2)] for name, seconds in actual]}

        def add(data: dict[str, Any]) -> None:
            factors = data["machines"].setdefault(self.machine, {}).setdefault("factors", {})
            for key, factor in learned:
                factors[key] = (factors.get(key, []) + [round(factor, 4)])[-KEEP:]
            data["jobs"] = (data.get("jobs", []) + [entry])[-200:]

        self._change(add)

    def _write(self) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.partial")
        tmp.write_text(json.dumps(self._data, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)


def cost_model(spec: ModelSpec, cuda: bool, device: str | None) -> CostModel:
    """The GPU's projection where its bandwidth is published, else the CPU's fitted costs."""
    from qexplorer.core.bench.bandwidth import published_bandwidth

    bandwidth = published_bandwidth(device) if cuda and device else None
    return projected_costs(spec, device, bandwidth) if bandwidth and device else CPU_COSTS


def estimate_jobs(spec: ModelSpec, jobs: Sequence[Any], data_dir: Path | str, *, cuda: bool = False,
                  vllm_found: bool | None = None, book: DurationBook | None = None, device: str | None = None,
                  simulated: bool = False) -> tuple[JobEstimate, ...]:
    """One estimate per job, in queue order: a job does not pay for what an earlier one leaves cached. On a
    ``simulated`` device nothing learned on this machine applies: the costs are the projection's or defaults."""
    from qexplorer.core.artifacts import model_key

    if not jobs:
        return ()
    model = cost_model(spec, cuda, device)
    if model.reference is None:
        vllm_found = True  # a projection is of the device as it will serve: with its engine
    elif vllm_found is None:
        from qexplorer.core.engines.vllm import find_vllm

        vllm_found = find_vllm() is not None
    book = book or DurationBook.in_dir(data_dir)
    calibration = None if simulated or model.reference is None else book.calibration()
    work_dir = Path(data_dir) / "artifacts" / model_key(spec)  # model_work_dir's path, without creating it
    from qexplorer.core.quality import reference_cached

    asked = {(job.quality_corpus, job.reference_precision, job.quality_ctx, job.quality_tokens, job.top_k)
             for job in jobs if job.quality}  # every job of a run asks for the same one or two: each looked up once
    references = frozenset(tokens for corpus, reference, ctx, tokens, top_k in asked if reference_cached(
        Path(data_dir), model_key(spec), corpus, reference, ctx, tokens, top_k))
    cached = cached_state(spec, work_dir, references)
    estimates = []
    for job in jobs:
        precision = BY_KEY[job.precision]
        phases, cached = job_phases(spec, precision, job, engine_for(precision, cuda, vllm_found), cached,
                                    model.pp_factor)
        parts = []
        for name, key, units in phases:
            cost = model.costs.get(key, UNKNOWN)
            base = cost.seconds(units)
            learned = None if simulated else book.factor(key)
            if learned is not None:
                parts.append(PhaseEstimate(name, key, units, base * learned, Source.MEASURED, base, cost.basis))
            elif model.reference is None:
                parts.append(PhaseEstimate(name, key, units, base, Source.PROJECTED, base, cost.basis))
            elif calibration is not None:
                slowdown = calibration.slowdown(cost.bound, model.reference)
                parts.append(PhaseEstimate(name, key, units, base * slowdown, Source.CALIBRATED, base, cost.basis))
            else:
                parts.append(PhaseEstimate(name, key, units, base, Source.DEFAULTS, base, cost.basis))
        estimates.append(JobEstimate(job.precision, tuple(parts), model.label, job.first_pass))
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
