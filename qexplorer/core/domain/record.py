"""The result of one job as a frozen, versioned record.

:class:`RunRecord` is what a worker returns, what the results store keeps (as
JSON), and what the compare screen, the exports and the CLI read - by
attribute, never by string key. A new metric is one field here (in the
sub-record it belongs to); the type checker then leads to every reader.

``RECORD_VERSION`` is written into each record. :func:`record_from_legacy`
reads the flat dictionaries that qexplorer 0.1 stored (schema 1), so old
stores open and are migrated in place.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from qexplorer.core.domain.bench import BenchConfig, Stat
from qexplorer.core.domain.load import Goodput, LevelLoad, LoadPlan, ServerMetrics
from qexplorer.core.kinds import Engine, Family, SupportMode
from qexplorer.core.serial import from_jsonable, to_jsonable

RECORD_VERSION = 2


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    path: str
    ref: str = ""
    params: int | None = None
    stored_dtype: str = ""
    stored_quantized: bool = False


@dataclass(frozen=True)
class EngineInfo:
    """What ran the artifact and how: the engine, native or emulated, where, and the artifact itself."""

    name: Engine | None = None
    mode: SupportMode = SupportMode.NATIVE
    device: str = "cpu"
    artifact_path: str | None = None
    artifact_bytes: int | None = None
    artifact_sha256: str | None = None  # of the file or folder measured: the export carries the same hash
    version: str = ""  # the engine's own version (vLLM 0.32.0, llama.cpp via llama-cpp-python 0.3.36, ...)
    kernel: str = ""  # what the engine says it chose (vLLM: "CPUInt8ScaledMMLinearKernel for ...")
    serve_command: str = ""  # the command that serves this artifact the way it was measured
    fallback_reason: str | None = None  # why the serving engine could not run it (then: transformers)
    expected_kernel: str = ""  # what the plan said the engine would pick here (vLLM: vllm_kernels.expected)
    dtype: str = ""  # the dtype the engine ran in, from its own log (vLLM: "bfloat16")
    graphs: str = ""  # vLLM: eager, or the CUDA graphs captured
    start_check: str = ""  # vLLM on CUDA: the utilization passed and the free memory it was computed from

    @property
    def is_fallback(self) -> bool:
        """A figure from the transformers fallback: weights dequantized, not serving speed."""
        return self.name == Engine.TRANSFORMERS


@dataclass(frozen=True)
class HardwareFacts:
    cpu: str = ""
    cores: int | None = None
    gpu: str | None = None
    machine: str = ""
    bandwidth_bytes_s: float | None = None
    bandwidth_source: str | None = None  # "published" or how the host copy test ran
    gpu_unified: bool | None = None  # the GPU shares host memory (GB10, Jetson); None: no GPU or unknown
    shown_profile: str | None = None  # the simulated profile on screen while it ran (the job itself was real)


@dataclass(frozen=True)
class MemoryFigures:
    planned_peak_bytes: int | None = None  # the planner's job peak
    planned_total_bytes: int | None = None  # the planner's serving total (weights + KV + overhead)
    baseline_rss_bytes: int | None = None  # the worker before it loaded anything
    loaded_rss_bytes: int | None = None  # right after the model loaded
    peak_rss_bytes: int | None = None  # the job's process tree, sampled from outside and the child's own maximum
    peak_gpu_bytes: int | None = None  # NVML, the job's process tree, when a GPU exists
    peak_gpu_source: str | None = None  # how that GPU figure was attributed (per-process, or device growth)
    torch_peak_allocated_bytes: int | None = None  # torch.cuda.max_memory_allocated in the worker
    torch_peak_reserved_bytes: int | None = None  # torch.cuda.max_memory_reserved (the caching allocator)
    weight_bytes: int | None = None  # the artifact's weights (what is served)
    resident_weight_bytes: int | None = None  # what the engine holds in memory while it runs
    bytes_per_token: int | None = None  # bytes read per decoded token (the roofline's denominator)
    kv_cache_bytes: int | None = None  # the KV cache the engine was given (vLLM: --kv-cache-memory-bytes)
    # the GPU memory the job grew by while its server ran (vLLM: from its start to its stop), seen from outside
    server_gpu_bytes: int | None = None


    def plan_check(self, gpu_unified: bool | None) -> PlanCheck:
        """The measured peak against the plan's term that matches where the memory lives: VRAM against the
        serving plan on a discrete card; RSS + GPU allocation against the job peak on unified memory and CPUs."""
        if gpu_unified is False and self.peak_gpu_bytes:
            return PlanCheck(self.peak_gpu_bytes, self.planned_total_bytes, "VRAM")
        if self.peak_rss_bytes is None:
            return PlanCheck(None, self.planned_peak_bytes, "RSS")
        term = "RSS + GPU" if self.peak_gpu_bytes is not None else "RSS"
        return PlanCheck(self.peak_rss_bytes + (self.peak_gpu_bytes or 0), self.planned_peak_bytes, term)


@dataclass(frozen=True)
class PlanCheck:
    measured_bytes: int | None
    planned_bytes: int | None
    term: str  # "VRAM", "RSS + GPU" or "RSS"

    @property
    def error_pct(self) -> float | None:
        """(planned − measured) / measured: negative when the plan was too low."""
        if not self.measured_bytes or not self.planned_bytes:
            return None
        return 100.0 * (self.planned_bytes - self.measured_bytes) / self.measured_bytes


@dataclass(frozen=True)
class Timings:
    quantize_s: float | None = None
    load_s: float | None = None
    quality_s: float | None = None
    tasks_s: float | None = None  # the task pass: generation and scoring


@dataclass(frozen=True)
class LengthAccuracy:
    """One chain length of the arithmetic probe: passed of n items."""

    length: int
    n: int
    passed: int


@dataclass(frozen=True)
class TaskScore:
    """One task on one artifact, with the serving engine: every item's outcome in the task's fixed item order, so
    that two precisions are compared item by item (core.tasks.summary)."""

    name: str  # "humaneval" or "arith"
    engine: str  # the engine that generated (llama.cpp, vllm, transformers)
    template: str  # "chat" (the model's chat template, instruct prompts) or "completion" (the raw prompt)
    n: int
    passed: int
    outcomes: tuple[bool, ...]  # item i passed, in the task's order
    items_sha256: str  # of the item ids in order: two scores are paired only on the same items
    max_new_tokens: int
    per_length: tuple[LengthAccuracy, ...] = ()  # arith: accuracy per chain length, shortest first
    sandbox: str = ""  # HumanEval: the isolation its programs ran under (core.tasks.sandbox)
    generated_tokens: int = 0  # what the engine generated for it (the ETA's units are the most it may)

    @property
    def accuracy(self) -> float | None:
        return self.passed / self.n if self.n else None


# When a timed figure is noisy (the reasons are in qexplorer.core.bench.noise): other processes took this share
# of the machine, or the repetitions spread by this much
NOISY_OTHER_CPU_PCT = 10.0
NOISY_CV_PCT = 5.0


@dataclass(frozen=True)
class Noise:
    """How quiet the machine was while a speed figure was timed (:mod:`qexplorer.core.bench.noise`)."""

    other_cpu_pct: float  # CPU time of every other process, % of the machine's cores over the timed window
    cv_pct: float | None  # coefficient of variation of the decode repetitions
    busiest: str | None = None  # the other process that used the most CPU: "name (pid N)"
    busiest_cpu_pct: float | None = None  # its share, % of one core
    noisy: bool = False
    reason: str | None = None  # one sentence when noisy


@dataclass(frozen=True)
class Speed:
    """llama-bench's figures: pp and tg as tokens/s over repetitions, TTFT in seconds, at one context depth."""

    prefill_tok_s: Stat
    decode_tok_s: Stat
    ttft_s: Stat
    prompt_tokens: int
    gen_tokens: int
    repetitions: int
    threads: int
    depth: int = 0  # tokens already in the context when pp / tg were timed (llama-bench -d)
    noise: Noise | None = None

    @property
    def noisy(self) -> bool:
        return self.noise is not None and self.noise.noisy


@dataclass(frozen=True)
class ReferenceInfo:
    """The reference a quality figure was measured against, and how the text was cut."""

    precision: str
    quantized: bool
    corpus: str
    corpus_sha256: str
    n_tokens: int
    ctx: int
    n_chunks: int
    top_k: int
    chunking: str
    cache_bytes: int = 0
    device: str = "cpu"  # where the reference ran
    candidate_device: str = "cpu"  # where the artifact's quality pass ran; different: labelled on screen


@dataclass(frozen=True)
class QualityStats:
    """llama-perplexity --kl-divergence's report (FACTS §4)."""

    n_positions: int
    ppl: float
    ppl_ref: float
    ln_ppl_ratio: float
    ln_ppl_ratio_se: float
    kld_mean: float
    kld_sd: float
    kld_se: float
    kld_median: float
    kld_p90: float
    kld_p95: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    same_top1_pct: float
    same_top1_se_pct: float
    delta_p_mean_pct: float
    delta_p_rms_pct: float
    reference: ReferenceInfo | None = None
    quality_peak_rss_bytes: int | None = None
    ppl_se: float | None = None  # the candidate's PPL × the standard error of its mean NLL (llama-perplexity's ±)
    # every scored position's KLD, float32 little-endian in base64: two precisions measured against the same
    # reference are paired position by position (core.compare: the SE of their difference); "" on old rows
    kld_positions: str = ""


@dataclass(frozen=True)
class InterTokenLatency:
    mean_ms: float
    p50_ms: float
    p99_ms: float
    n: int
    p90_ms: float | None = None  # absent from records written before the load sweep


@dataclass(frozen=True)
class ServerLevel:
    """One depth × concurrency test of a server sweep, with llama-benchy's figures (its names where it has them).

    At concurrency 1, ``pp_tok_s`` / ``tg_tok_s`` are per request; above 1, the batch's totals, as llama-benchy's
    "t/s (total)": prompt tokens of all streams ÷ (last first token − first start), generated tokens after the
    first of each stream ÷ (last end − first first token)."""

    concurrency: int
    aggregate_tok_s: Stat  # every generated token of every stream ÷ the level's wall time
    decode_tok_s_per_stream: Stat | None  # each stream's own (tokens − 1) ÷ (end − first token)
    ttft_s: Stat | None  # e2e_ttft: first token − request start
    itl: InterTokenLatency | None
    tokens: int
    depth: int = 0  # context tokens before the prompt (llama-benchy --depth)
    prompt_tokens: int = 0  # the prompt's own tokens (pp), as the server counted them when it said (usage)
    pp_tok_s: Stat | None = None  # (depth + pp) ÷ est_ppt
    tg_tok_s: Stat | None = None
    ttfr_s: Stat | None = None  # first response of any kind − request start
    est_ppt_s: Stat | None = None  # ttfr − the measured round-trip latency
    noise: Noise | None = None
    load: LevelLoad | None = None  # percentiles, rates and errors (GuideLLM's names); None in older records
    server_metrics: ServerMetrics | None = None  # the server's /metrics during the level; None: not scraped


@dataclass(frozen=True)
class ServerProcess:
    """The server's own process, when it runs on this host (found from the listening port)."""

    pid: int
    name: str
    peak_rss_bytes: int | None  # its process tree, sampled while the sweep ran
    note: str = ""


@dataclass(frozen=True)
class ServerQuality:
    """KLD and top-1 from a server's echoed log-probabilities: approximate, a lower bound."""

    kld_mean: float | None
    n_positions: int
    top_k: int
    same_top1_pct: float | None
    same_top1_se_pct: float | None
    approximation: str
    logprob_alignment: str
    n_disjoint: int = 0  # positions where the two top-k lists shared nothing: top-1 misses, outside the KLD mean


@dataclass(frozen=True)
class ServerSweep:
    model_id: str
    host: str
    max_tokens: int
    repetitions: int
    token_count: str
    levels: tuple[ServerLevel, ...] = ()
    error: str | None = None  # why the sweep stopped early; the finished levels stay
    quality: ServerQuality | None = None
    quality_error: str | None = None
    latency_ms: float | None = None  # mean round trip of GET /v1/models (llama-benchy's "api" latency mode)
    prompt_tokens: int = 0  # pp asked for
    depths: tuple[int, ...] = (0,)
    unique_prompts: bool = True  # False: the same prompt every time (a prefix-cache test)
    exact_output: str = ""  # how the output length was held: "ignore_eos + min_tokens", or why it was not
    process: ServerProcess | None = None
    process_note: str | None = None  # why the server's memory is not shown (remote host, no permission)
    load_plan: LoadPlan | None = None  # set for a load sweep (errors counted, stop rule, objective)
    stopped_early: str | None = None  # the sentence why a load sweep skipped its remaining levels
    goodput: tuple[Goodput, ...] = ()  # one per depth, for a load sweep
    metrics_note: str | None = None  # why the server's /metrics is not shown

    @property
    def single_stream(self) -> ServerLevel | None:
        return next((level for level in self.levels if level.concurrency == 1), None)


@dataclass(frozen=True)
class RunRecord:
    """One job's result. Failed jobs keep a record too: identity, plan and the memory seen before the end."""

    model: ModelIdentity
    precision: str
    precision_label: str
    family: Family
    engine: EngineInfo = field(default_factory=EngineInfo)
    hardware: HardwareFacts | None = None
    versions: dict[str, str] = field(default_factory=dict)
    bench: BenchConfig | None = None
    memory: MemoryFigures = field(default_factory=MemoryFigures)
    timings: Timings = field(default_factory=Timings)
    speed: Speed | None = None  # at the first depth asked for (0 unless told otherwise)
    depth_speeds: tuple[Speed, ...] = ()  # the other depths, deepest last
    roofline_pct: float | None = None
    depth_rooflines: tuple[float | None, ...] = ()  # depth_speeds' rooflines, each with its depth's KV term
    roofline_note: str | None = None  # set when the figure is above 100 %: then it is a sign of an error, not a fact
    quality: QualityStats | None = None  # of the artifact itself (activation quantization included)
    engine_quality: ServerQuality | None = None  # the serving engine's own log-probs (vLLM: top-20, a lower bound)
    server: ServerSweep | None = None
    # jobs.overlap: the timed phases ran alone; these jobs were paused (SIGSTOP) for them
    paused_for_timing: tuple[str, ...] = ()
    shared_phases: tuple[str, ...] = ()  # this job's untimed phases during which another job's worker ran
    reuse_key: str | None = None  # what the figures depend on (core.reuse); equal key, equal measurement
    reused_from: int | None = None  # set when this result is an earlier measurement shown again (core.reuse)
    reused_measured_at: str | None = None  # when that earlier measurement was made (ISO 8601, UTC)
    first_pass: bool = False  # the quick first answer (JobSpec.first_pass): replaced when the full figures land
    tasks: tuple[TaskScore, ...] = ()  # task accuracy with the serving engine (JobSpec.tasks); () when not asked
    task_error: str | None = None  # the task pass failed (one sentence); the benchmark and quality are kept
    version: int = RECORD_VERSION

    @property
    def busy_host(self) -> bool:
        """Some speed of it was timed while other processes used the CPU (the noise probe's first rule)."""
        return any(s is not None and s.noise is not None and s.noise.other_cpu_pct >= NOISY_OTHER_CPU_PCT
                   for s in (self.speed, *self.depth_speeds))

    def settings_key(self) -> tuple[Any, ...]:
        """What two results must share to be compared side by side: the benchmark's shape (pp, tg, depths) and
        threads, the machine (CPU, GPU), and the quality settings (corpus by content, chunk length, tokens,
        top-k, reference precision; None without quality). Rows with different keys are never ranked together."""
        speed, hw = self.speed, self.hardware
        bench = ((speed.prompt_tokens, speed.gen_tokens, speed.depth, tuple(s.depth for s in self.depth_speeds),
                  speed.threads) if speed is not None else None)
        ref = self.quality.reference if self.quality is not None else None
        quality = ((ref.corpus_sha256, ref.ctx, ref.n_tokens, ref.top_k, ref.precision) if ref is not None
                   else "measured" if self.quality is not None else None)
        # tasks are not part of it: a row without them still ranks on speed and KLD beside rows with them, and two
        # task scores are compared only on the same items (core.tasks.summary pairs them by items_sha256)
        return (bench, hw.cpu if hw else None, hw.gpu if hw else None, quality)

    def settings_text(self) -> str:
        """The settings of :meth:`settings_key` in words, for a row shown beside others it cannot be ranked with."""
        speed, hw = self.speed, self.hardware
        parts = []
        if speed is not None:
            depths = ", ".join(str(d) for d in (speed.depth, *(s.depth for s in self.depth_speeds)))
            parts.append(f"pp{speed.prompt_tokens}/tg{speed.gen_tokens} at depth {depths}, {speed.threads} threads")
        if hw is not None:
            parts.append(hw.gpu or hw.cpu or "unknown machine")
        ref = self.quality.reference if self.quality is not None else None
        if ref is not None:
            parts.append(f"quality on {ref.corpus} ({ref.n_tokens} tokens, ctx {ref.ctx}) vs {ref.precision}")
        elif self.quality is None:
            parts.append("no quality")
        return "; ".join(parts)

    def with_memory(self, **changes: Any) -> RunRecord:
        return replace(self, memory=replace(self.memory, **changes))

    @property
    def is_quality_reference(self) -> bool:
        """This row is the reference precision measured on the reference's own device: its quality row is the
        reference pass itself (KLD 0 and top-1 100 % by definition, not measured)."""
        ref = self.quality.reference if self.quality else None
        return ref is not None and ref.precision == self.precision and ref.device == ref.candidate_device

    def to_json(self) -> dict[str, Any]:
        return to_jsonable(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> RunRecord:
        """Reads this version and every earlier one; raises ValueError on a damaged record."""
        if "version" not in data:
            return record_from_legacy(data)
        return from_jsonable(RunRecord, data)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))


@dataclass(frozen=True)
class ExportRecord:
    """What an export job wrote, and the command that serves it."""

    export_path: str
    format: str  # "gguf", "hf" or "compressed-tensors"
    bytes: int
    serve_command: str
    sha256: str = ""  # equals the artifact_sha256 of the runs that measured this artifact

    def to_json(self) -> dict[str, Any]:
        return to_jsonable(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> ExportRecord:
        return from_jsonable(ExportRecord, data)


# ------------------------------------------------------------------ schema 1
def _stat(value: Any) -> Stat | None:
    if not isinstance(value, dict) or value.get("mean") is None:
        return None
    return Stat(float(value["mean"]), float(value.get("sd") or 0.0), int(value.get("n") or 0))


def record_from_legacy(r: dict[str, Any]) -> RunRecord:
    """A schema-1 flat dictionary (qexplorer 0.1) as a :class:`RunRecord`."""
    hw = r.get("hardware") or {}
    q = r.get("quality") or {}
    speed = None
    if _stat(r.get("decode_tok_s")) is not None:
        speed = Speed(prefill_tok_s=_stat(r.get("prefill_tok_s")) or Stat(0.0, 0.0, 0),
                      decode_tok_s=_stat(r["decode_tok_s"]) or Stat(0.0, 0.0, 0),
                      ttft_s=_stat(r.get("ttft_s")) or Stat(0.0, 0.0, 0),
                      prompt_tokens=int(r.get("prompt_tokens") or 0), gen_tokens=int(r.get("gen_tokens") or 0),
                      repetitions=int(r.get("repetitions") or 0), threads=int(r.get("threads") or 0))
    quality = None
    if q.get("kld_mean") is not None:
        names = [n for n in QualityStats.__dataclass_fields__
                 if n not in ("reference", "quality_peak_rss_bytes", "ppl_se", "kld_positions")]
        reference = None
        if q.get("corpus") is not None:
            reference = ReferenceInfo(precision=str(q.get("reference_precision") or "bf16"),
                                      quantized=bool(q.get("reference_quantized")), corpus=str(q["corpus"]),
                                      corpus_sha256=str(q.get("corpus_sha256") or ""),
                                      n_tokens=int(q.get("n_tokens") or 0), ctx=int(q.get("ctx") or 0),
                                      n_chunks=int(q.get("n_chunks") or 0), top_k=int(q.get("top_k") or 0),
                                      chunking=str(q.get("chunking") or ""),
                                      cache_bytes=int(q.get("reference_cache_bytes") or 0))
        # a field this old row lacks is NaN (never measured), not 0.0: domain.bench.known() turns it into None
        values = {n: float(q[n]) if q.get(n) is not None else math.nan for n in names}
        values["n_positions"] = int(q.get("n_positions") or 0)
        quality = QualityStats(**values, reference=reference,
                               quality_peak_rss_bytes=q.get("quality_peak_rss_bytes"))
    server = None
    if isinstance(r.get("server"), dict):
        s = r["server"]
        levels = tuple(ServerLevel(
            concurrency=int(lv["concurrency"]), aggregate_tok_s=_stat(lv.get("aggregate_tok_s")) or Stat(0, 0, 0),
            decode_tok_s_per_stream=_stat(lv.get("decode_tok_s_per_stream")), ttft_s=_stat(lv.get("ttft_s")),
            itl=InterTokenLatency(lv["itl_ms"]["mean"], lv["itl_ms"]["p50"], lv["itl_ms"]["p99"],
                                  int(lv["itl_ms"]["n"])) if lv.get("itl_ms") else None,
            tokens=int(lv.get("tokens") or 0)) for lv in s.get("levels", []))
        server = ServerSweep(model_id=str(s.get("model_id", "?")), host=str(s.get("host", "?")),
                             max_tokens=int(s.get("max_tokens") or 0), repetitions=int(s.get("repetitions") or 0),
                             token_count=str(s.get("token_count", "")), levels=levels, error=s.get("error"))
    bench = BenchConfig(**r["bench_config"]) if isinstance(r.get("bench_config"), dict) else None
    family = r.get("family") or "torch"
    return RunRecord(
        model=ModelIdentity(name=str(r.get("model_name", "?")), path=str(r.get("model_path", "?")),
                            ref=str(r.get("model_ref") or ""), params=r.get("model_params"),
                            stored_dtype=str(r.get("model_stored_dtype") or ""),
                            stored_quantized=bool(r.get("reference_quantized"))),
        precision=str(r.get("precision", "?")), precision_label=str(r.get("precision_label") or r.get("precision", "?")),
        family=Family(family) if family in Family._value2member_map_ else Family.TORCH,
        engine=EngineInfo(name=Engine(r["backend"]) if r.get("backend") in Engine._value2member_map_ else None,
                          mode=SupportMode(r["mode"]) if r.get("mode") in SupportMode._value2member_map_
                          else SupportMode.NATIVE,
                          device=str(r.get("device") or "cpu"), artifact_path=r.get("artifact_path"),
                          artifact_bytes=r.get("artifact_bytes")),
        hardware=HardwareFacts(cpu=str(hw.get("cpu") or ""), cores=hw.get("cores"), gpu=hw.get("gpu"),
                               machine=str(hw.get("machine") or ""), bandwidth_bytes_s=hw.get("bandwidth_bytes_s"),
                               bandwidth_source=hw.get("bandwidth_source")) if hw else None,
        versions=dict(r.get("versions") or {}), bench=bench,
        memory=MemoryFigures(**{k: r.get(k) for k in MemoryFigures.__dataclass_fields__}),
        timings=Timings(quantize_s=r.get("quantize_s"), load_s=r.get("load_s"), quality_s=q.get("quality_s")),
        speed=speed, roofline_pct=r.get("roofline_pct"), quality=quality, server=server,
    )
