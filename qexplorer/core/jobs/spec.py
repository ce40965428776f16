"""What a job is: :class:`JobSpec` (crosses the process boundary as JSON), and
:func:`plan_jobs`, the one place that turns a plan into job specs (the CLI's
``run`` and the app's ``r`` both call it)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qexplorer.core.bench import BenchConfig
from qexplorer.core.kinds import JobAction, Verdict
from qexplorer.core.serial import from_jsonable, to_jsonable

if TYPE_CHECKING:
    from qexplorer.core.model import ModelSpec
    from qexplorer.core.precisions import Precision
    from qexplorer.core.telemetry import TelemetrySnapshot


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs for one model × one precision."""

    model_ref: str
    precision: str
    data_dir: str
    bench: BenchConfig = field(default_factory=BenchConfig)
    model_paths: tuple[str, ...] = ()
    quality: bool = False
    quality_corpus: str | None = None  # a text file or folder; None: the default corpus
    quality_tokens: int = 4096
    quality_ctx: int = 512
    reference_precision: str = "bf16"
    top_k: int = 256
    phase_timeout_s: float = 1800.0
    planned_peak_bytes: int | None = None
    planned_total_bytes: int | None = None
    model_name: str = ""  # filled by the parent for failure records
    model_path: str = ""
    action: JobAction = JobAction.RUN
    trust_remote_code: bool = False
    export_path: str | None = None
    engine_args: tuple[str, ...] = ()  # passed to the serving engine as they are (vLLM: --tensor-parallel-size 2 ...)
    shown_profile: str | None = None  # --simulate's profile, recorded on the result; the job itself runs for real
    reuse: bool = True  # show a stored measurement again when nothing it depends on changed (core.reuse)
    # started beside a measuring job (jobs.overlap): its untimed preparation runs on this many threads, so it
    # takes what the other leaves instead of oversubscribing the cores; the benchmark's count from its first
    # timed phase on. 0: the benchmark's count throughout
    prepare_threads: int = 0

    def to_json(self) -> dict[str, Any]:
        return to_jsonable(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> JobSpec:
        return from_jsonable(JobSpec, data)


@dataclass(frozen=True)
class ServerSpec:
    """Benchmark a running OpenAI-compatible server: runs in the queue's thread, no worker process."""

    url: str
    api_key_env: str | None = None
    timeout_s: float = 60.0
    levels: tuple[int, ...] = (1, 4, 16)
    repetitions: int = 3
    max_tokens: int = 64
    prompt_tokens: int = 128
    depths: tuple[int, ...] = (0,)
    unique: bool = True  # False: the same prompt every time (a prefix-cache test)


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


def plan_jobs(model: ModelSpec, precisions: Iterable[Precision], snapshot: TelemetrySnapshot | None,
              template: JobSpec, *, force: bool = False) -> PlannedJobs:
    """One spec per precision, in the order given, with the plan's figures; what does not fit is refused
    (or, with ``force``, queued anyway). ``template`` carries the options every job shares."""
    from qexplorer.core.planner import PlanRequest, QualityPlan, plan_job_peak, plan_precision
    bench = template.bench
    request = PlanRequest(context=bench.context_tokens)  # depth + pp + tg: the deepest test's KV cache
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
        specs.append(replace(
            template, precision=precision.key, model_name=model.name, model_path=model.path,
            planned_peak_bytes=plan_job_peak(model, precision, bench, on_gpu=plan.runs_on == "GPU",
                                             vllm=plan.engine == "vllm", quality=quality),
            planned_total_bytes=plan.total_bytes,
        ))
    return PlannedJobs(tuple(specs), tuple(refused))
