"""What a job is: :class:`JobSpec` (crosses the process boundary as JSON) and :class:`ServerSpec` (a running
server to benchmark). :func:`qexplorer.core.session.plan_run` makes them from a plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qexplorer.core.domain.bench import BenchConfig
from qexplorer.core.domain.load import LoadPlan, LoadSweepSpec
from qexplorer.core.kinds import JobAction
from qexplorer.core.serial import from_jsonable, to_jsonable


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
    planned_gpu_bytes: int | None = None  # on a discrete card: the plan's VRAM (its serving total); else None
    vllm_overhead_bytes: int | None = None  # vLLM's GPU overhead as this machine's runs refitted it (the parent's)
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
    # the first answer (session.plan_run): a quick pass of every precision before the full method; its result
    # is shown labelled "quick" until this precision's full figures land, then gives way to them
    first_pass: bool = False
    # task accuracy after the benchmark, with the same engine (core.tasks.run): ("humaneval", "arith:8"); () off
    tasks: tuple[str, ...] = ()
    tasks_limit: int | None = None  # at most this many items per task (a subset, for a quick look); None: all
    # HumanEval runs model-written code: without network isolation only when the user said so
    allow_unisolated_exec: bool = False
    # capacity under load after the benchmark, in the same engine (issue 25); None: off (the default: it is long)
    load: LoadSweepSpec | None = None

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
    load: LoadPlan | None = None  # a load sweep: errors counted, early stop, goodput under the objective
