"""One run plan for both front ends: what the CLI's ``qexplorer run`` and the app's ``r`` queue.

A front end gathers :class:`RunOptions` (its flags, or the plan screen's settings and options dialog), takes
one telemetry snapshot and calls :func:`plan_run`; it renders the :class:`RunPlan` it gets (the order, what
does not fit, each job's estimate) and submits its specs. Nothing here orders, plans or estimates twice, so the
two front ends cannot drift: every option the CLI has, the app has.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from qexplorer.core.domain.bench import BenchConfig
from qexplorer.core.domain.load import LoadSweepSpec
from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.eta import JobEstimate, Source, cost_order, estimate_jobs, start_order
from qexplorer.core.kinds import Verdict
from qexplorer.core.model import ModelSpec
from qexplorer.core.precisions import Precision
from qexplorer.core.telemetry import TelemetrySnapshot


class RunOrder(StrEnum):
    OVERLAP = "overlap"  # the next job prepares beside the running one; long preparations start early
    ONE_AT_A_TIME = "one-at-a-time"  # cheapest first, nothing beside the running job
    AS_LISTED = "as-listed"  # the user's order, overlapping


@dataclass(frozen=True)
class RunOptions:
    """Everything a run can be told, the CLI's flags and the app's settings alike."""

    bench: BenchConfig = field(default_factory=BenchConfig)
    quality: bool = False
    corpus: str | None = None  # a UTF-8 file or folder; None: the shipped prose + stdlib
    quality_tokens: int = 4096
    quality_ctx: int = 512
    reference: str = "bf16"
    engine_args: tuple[str, ...] = ()
    trust_remote_code: bool = False
    reuse: bool = True
    order: RunOrder = RunOrder.OVERLAP
    force: bool = False
    shown_profile: str | None = None  # --simulate's profile, recorded on each result
    # a quick pass of every precision not measured before, ahead of the full method (the first answer)
    first_answer: bool = True
    # task accuracy after each full job's benchmark (core.tasks.run): ("humaneval", "arith:8"); () off
    tasks: tuple[str, ...] = ()
    tasks_limit: int | None = None
    allow_unisolated_exec: bool = False
    # capacity under load after each full job's benchmark (issue 25); None: off, the default (it is long)
    load: LoadSweepSpec | None = None

    @property
    def overlap(self) -> bool:
        return self.order != RunOrder.ONE_AT_A_TIME


@dataclass(frozen=True)
class RunPlan:
    specs: tuple[JobSpec, ...]
    refused: tuple[Refusal, ...]
    estimates: tuple[JobEstimate, ...]
    overlap: bool

    @property
    def total_s(self) -> float:
        return sum(e.total_s for e in self.estimates)

    @property
    def first_answers_s(self) -> float | None:
        """When the last quick first answer is due (one job after another), None without a quick pass."""
        quick = [e.total_s for s, e in zip(self.specs, self.estimates, strict=True) if s.first_pass]
        return sum(quick) if quick else None

    @property
    def order_text(self) -> str:
        return " → ".join(s.precision + (" (quick)" if s.first_pass else "") for s in self.specs)


FIRST_ANSWER_S = 180.0  # the first answer for every precision within this, on the machines measured (issue 26)
QUICK_QUALITY_TOKENS = 1024  # the quick pass's quality: two 512-token chunks


def first_pass(full: Sequence[JobSpec], measured: Iterable[str] = ()) -> tuple[JobSpec, ...]:
    """A quick job ahead of each full one whose precision has no result yet (``measured``): llama-bench's
    quick shape (pp64 / tg16 × 2) and, with quality, the first 1024 tokens of the evaluation text - so that
    every precision is answered within :data:`FIRST_ANSWER_S` before the full method runs. Measured here
    (scripts/bench_jobs.py decision): the full ladder's first answer came at 70-90 s and its last at 163-228 s
    on one 2-core machine and 589 s on another; the artifacts and engine starts the quick pass makes are the
    full pass's too, so the quick jobs mostly cost their own short measurements."""
    seen = set(measured)
    quick = BenchConfig.quick()
    return tuple(replace(spec, bench=replace(spec.bench, prompt_tokens=quick.prompt_tokens,
                                             gen_tokens=quick.gen_tokens, repetitions=quick.repetitions,
                                             min_repetitions=quick.min_repetitions, depths=(0,)),
                         quality_tokens=min(spec.quality_tokens, QUICK_QUALITY_TOKENS), first_pass=True,
                         tasks=(), load=None)  # tasks and load belong to the full job: the quick answer is speed and quality
                 for spec in full if spec.precision not in seen)


def is_quick(bench: BenchConfig) -> bool:
    quick = BenchConfig.quick()
    return (bench.prompt_tokens, bench.gen_tokens, bench.repetitions) <= (quick.prompt_tokens, quick.gen_tokens,
                                                                          quick.repetitions)


def ordered(model: ModelSpec, chosen: Sequence[Precision], order: RunOrder) -> list[Precision]:
    if order == RunOrder.AS_LISTED:
        return list(chosen)
    return cost_order(model, chosen) if order == RunOrder.ONE_AT_A_TIME else start_order(model, chosen)


def plan_run(model_ref: str, model: ModelSpec, chosen: Sequence[Precision], options: RunOptions,
             snapshot: TelemetrySnapshot | None, data_dir: Path, model_paths: Sequence[str] = (), *,
             cuda: bool = False, estimates: tuple[JobEstimate, ...] | None = None,
             measured: Iterable[str] = ()) -> RunPlan:
    """The jobs for these precisions in the order they start, planned against ``snapshot`` (the real
    machine's), each with its estimate. ``estimates`` from an earlier call for the same jobs and settings skip
    the estimate (the plan screen re-plans every sample; the estimate changes only with the jobs). With
    ``options.first_answer`` the precisions not ``measured`` before get a quick pass first (:func:`first_pass`)."""
    template = JobSpec(
        model_ref=model_ref, precision="", data_dir=str(data_dir), bench=options.bench,
        model_paths=tuple(model_paths), quality=options.quality, quality_corpus=options.corpus,
        quality_tokens=options.quality_tokens, quality_ctx=options.quality_ctx,
        reference_precision=options.reference, trust_remote_code=options.trust_remote_code,
        engine_args=options.engine_args, shown_profile=options.shown_profile, reuse=options.reuse,
        tasks=options.tasks, tasks_limit=options.tasks_limit, allow_unisolated_exec=options.allow_unisolated_exec,
        load=options.load,
    )
    order = ordered(model, chosen, options.order)
    planned = plan_jobs(model, order, snapshot, template, force=options.force)
    specs = planned.specs
    if options.first_answer and options.reuse and not is_quick(options.bench):
        # the quick jobs carry no task pass and no load sweep: their planned peak is planned without them
        bare = (planned if not (template.tasks or template.load) else
                plan_jobs(model, order, snapshot, replace(template, tasks=(), load=None), force=options.force))
        specs = first_pass(bare.specs, measured) + specs
    if estimates is None or len(estimates) != len(specs):
        estimates = estimate_jobs(model, specs, data_dir, cuda=cuda, **_device_of(snapshot))
    return RunPlan(specs, planned.refused, estimates, options.overlap)


@dataclass(frozen=True)
class Refusal:
    precision: str
    label: str
    need_bytes: int | None
    headroom_bytes: int | None


@dataclass(frozen=True)
class PlannedJobs:
    specs: tuple[JobSpec, ...]
    refused: tuple[Refusal, ...]


def _device_of(snapshot: TelemetrySnapshot | None) -> dict[str, Any]:
    """What the estimate needs to know of the device: its name (a GPU's published figures), and whether it is
    simulated (then nothing learned on this machine applies to it)."""
    device = snapshot.devices[0].name if snapshot is not None and snapshot.devices else None
    return {"device": device, "simulated": bool(snapshot is not None and snapshot.simulated)}


def job_estimates(model: ModelSpec, precisions: Iterable[Precision], data_dir: str | Path,
                  snapshot: TelemetrySnapshot | None, quality: bool = False) -> dict[str, dict[str, Any]]:
    """Each precision's job alone (nothing cached but what is on disk), with the default benchmark, as the plan
    shows it: seconds, the phases (each with what a projected figure rests on), and where the costs come from -
    always labelled estimated ("projected" on a GPU's published figures)."""
    cuda = bool(snapshot is not None and snapshot.devices)
    out = {}
    for precision in precisions:
        job = JobSpec(model_ref=model.path, precision=precision.key, data_dir=str(data_dir), quality=quality)
        (estimate,) = estimate_jobs(model, [job], data_dir, cuda=cuda, **_device_of(snapshot))
        out[precision.key] = {"seconds": round(estimate.total_s, 1), "label": "estimated",
                              "projected": any(p.source == Source.PROJECTED for p in estimate.phases),
                              "source": estimate.source,
                              "phases": [[p.name, round(p.seconds, 1)] + ([p.basis] if p.basis else [])
                                         for p in estimate.phases]}
    return out


def calibrate_machine(data_dir: str | Path, threads: int, say: Any = None) -> None:
    """On a machine's first use, measure its calibration (a few seconds, in a child process) and keep it, so that
    the estimates are scaled to it instead of trusting another machine's defaults; nothing where it has one or
    calibration is switched off (:data:`~qexplorer.core.calibration.NO_CALIBRATION_ENV`). ``say`` is told
    before it starts and what it found."""
    from qexplorer.core import calibration
    from qexplorer.core.eta import DurationBook

    book = DurationBook.in_dir(data_dir)
    if book.calibration() is not None or not calibration.enabled():
        return
    if say:
        say("calibrating this machine for the time estimates (first use, a few seconds)")
    found = calibration.measure_in_child(threads)
    if found is not None:
        book.keep_calibration(found)
    if say:
        say(f"calibrated: {found.describe()}" if found else "calibration failed: estimates use another machine's "
            "defaults until jobs have run here")


def learned_vllm_overhead(data_dir: str | Path, snapshot: TelemetrySnapshot | None) -> int | None:
    """vLLM's overhead on this machine's GPU as its own vLLM runs measured it (durations.json), or None."""
    from qexplorer.core.eta import DurationBook
    from qexplorer.core.serving.vllm_launch import OVERHEAD_KEY

    if snapshot is None or not snapshot.devices or snapshot.simulated:
        return None
    return DurationBook.in_dir(data_dir).learned_bytes(OVERHEAD_KEY, snapshot.devices[0].name)


def capped_load(load: LoadSweepSpec, model: ModelSpec, precision: Precision, snapshot: TelemetrySnapshot | None,
                request: Any) -> LoadSweepSpec:
    """The load sweep's levels within the plan's capacity at the sweep's context (core.capacity: the sequences
    whose KV cache fits beside the weights and the engine's overhead in the live headroom); the levels above it
    are kept as ``dropped`` and said in the job's log. At least one stream is always tried."""
    from qexplorer.core.planner import plan_precision

    at_context = plan_precision(model, precision, replace(request, context=load.context_tokens), snapshot)
    capacity = at_context.capacity.sequences if at_context.capacity is not None else None
    if capacity is None:
        return load
    kept = tuple(level for level in load.levels if level <= max(1, capacity)) or (1,)
    return replace(load, levels=kept, dropped=tuple(level for level in load.levels if level not in kept),
                   capacity=capacity)


def plan_jobs(model: ModelSpec, precisions: Iterable[Precision], snapshot: TelemetrySnapshot | None,
              template: JobSpec, *, force: bool = False) -> PlannedJobs:
    """One spec per precision, in the order given, with the plan's figures; what does not fit is refused
    (or, with ``force``, queued anyway). ``template`` carries the options every job shares."""
    from qexplorer.core.planner import PlanRequest, QualityPlan, plan_job_peak, plan_precision
    bench = template.bench
    # depth + pp + tg: the deepest test's KV cache; vLLM's GPU overhead as this machine's runs refitted it
    request = PlanRequest(context=bench.context_tokens,
                          vllm_overhead_bytes=learned_vllm_overhead(template.data_dir, snapshot))
    specs, refused = [], []
    builds_reference = False
    if template.quality:  # the first job with quality computes the reference (unless cached); the rest reuse it
        from qexplorer.core.artifacts import model_key
        from qexplorer.core.quality import reference_cached

        builds_reference = not reference_cached(
            Path(template.data_dir), model_key(model), template.quality_corpus, template.reference_precision,
            template.quality_ctx, template.quality_tokens, template.top_k)
    for precision in dict.fromkeys(precisions):  # each once, first mention wins
        plan = plan_precision(model, precision, request, snapshot)
        if plan.verdict == Verdict.DOES_NOT_FIT and not force:
            refused.append(Refusal(precision.key, precision.label, plan.total_bytes, plan.headroom_bytes))
            continue
        quality = QualityPlan(template.quality_ctx, builds_reference and not specs) if template.quality else None
        load = capped_load(template.load, model, precision, snapshot, request) if template.load else None
        specs.append(replace(
            template, precision=precision.key, load=load, model_name=model.name, model_path=model.path,
            planned_peak_bytes=plan_job_peak(model, precision, bench, on_gpu=plan.runs_on == "GPU",
                                             vllm=plan.engine == "vllm", quality=quality,
                                             vllm_overhead=request.vllm_overhead_bytes, tasks=bool(template.tasks),
                                             load=load),
            planned_total_bytes=plan.total_bytes,
            vllm_overhead_bytes=request.vllm_overhead_bytes,
            planned_gpu_bytes=plan.total_bytes if plan.runs_on == "GPU" and snapshot is not None
            and snapshot.devices and snapshot.devices[0].unified is False else None,
        ))
    return PlannedJobs(tuple(specs), tuple(refused))
