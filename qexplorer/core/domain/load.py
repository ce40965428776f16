"""The values of a load sweep: what one concurrency level measured under load (:class:`LevelLoad`, field names
as GuideLLM's report where it has them), what the server said about itself meanwhile (:class:`ServerMetrics`,
from its Prometheus ``/metrics``), the service objective the user sets (:class:`ServiceObjective`), when a sweep
stops early (:class:`StopRule`), and the answer (:class:`Goodput`). The rules that use them are
:mod:`qexplorer.core.server.load`; this module holds data only, so the record can import it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Percentiles:
    """A distribution as GuideLLM reports one: mean and nearest-rank p50 / p90 / p99 over ``n`` samples."""

    mean: float
    p50: float
    p90: float
    p99: float
    n: int


@dataclass(frozen=True)
class LevelLoad:
    """One concurrency level under load, over its timed repetitions (warm-up excluded).

    ``output_tokens_per_second``: every generated token ÷ the repetitions' summed wall time;
    ``requests_per_second``: successful requests ÷ the same time (GuideLLM's names)."""

    time_to_first_token_ms: Percentiles | None
    inter_token_latency_ms: Percentiles | None  # every gap between two streamed tokens of one request
    output_tokens_per_second: float
    requests_per_second: float
    successful: int
    errored: int
    first_error: str | None = None  # the first failure's sentence, when any request failed

    @property
    def error_rate(self) -> float:
        total = self.successful + self.errored
        return self.errored / total if total else 0.0


@dataclass(frozen=True)
class ServerMetrics:
    """The server's own view of one level, scraped from its ``/metrics`` while the level ran.

    Peaks and maxima over the samples; counters as the difference from the level's start to its end."""

    engine: str  # "vLLM" or "llama-server": whose metric names were found
    samples: int
    interval_s: float
    kv_cache_usage_peak_pct: float | None = None
    running_max: int | None = None  # requests the engine was running (vLLM) / processing (llama-server)
    waiting_max: int | None = None  # requests queued (vLLM waiting, llama-server deferred)
    preemptions: int | None = None  # vLLM: requests preempted during the level
    prefill_s_per_request: float | None = None  # vLLM: mean time in PREFILL of the requests finished meanwhile
    decode_s_per_request: float | None = None  # vLLM: mean time in DECODE
    server_prompt_tok_s: float | None = None  # llama-server: prompt tokens ÷ its prompt-processing seconds
    server_decode_tok_s: float | None = None  # llama-server: generated tokens ÷ its generation seconds


@dataclass(frozen=True)
class ServiceObjective:
    """What "serves well" means: a request's first token within ``ttft_p99_s`` and each next token within
    ``itl_p99_ms``, both at the 99th percentile, and at most ``max_error_rate`` of requests failing."""

    ttft_p99_s: float = 2.0
    itl_p99_ms: float = 100.0
    max_error_rate: float = 0.0

    def describe(self) -> str:
        errors = "no errors" if self.max_error_rate == 0 else f"errors ≤ {100 * self.max_error_rate:g} %"
        return f"TTFT p99 ≤ {self.ttft_p99_s:g} s, ITL p99 ≤ {self.itl_p99_ms:g} ms, {errors}"


@dataclass(frozen=True)
class StopRule:
    """When further concurrency levels are meaningless (after GuideLLM's stop constraints; see
    :mod:`qexplorer.core.server.load`): a level whose error rate reaches ``max_error_rate``; saturation, a level
    whose output tok/s is less than ``min_throughput_gain`` above the best earlier level while its TTFT p99 grew
    by more than ``min_ttft_growth``; and, when set, a level that misses the objective by more than
    ``beyond_objective`` times a limit."""

    max_error_rate: float = 0.1
    min_throughput_gain: float = 0.10
    min_ttft_growth: float = 0.25
    beyond_objective: float | None = None


@dataclass(frozen=True)
class LoadPlan:
    """A load sweep's settings: the objective, the stop rule, and whether to scrape ``/metrics``."""

    objective: ServiceObjective = field(default_factory=ServiceObjective)
    stop: StopRule = field(default_factory=StopRule)
    metrics_interval_s: float = 0.5  # 0: do not scrape


@dataclass(frozen=True)
class Goodput:
    """The highest concurrency that met the objective at one depth, and the throughput there; ``None``s and the
    reason in ``sentence`` when no level did."""

    depth: int
    concurrency: int | None
    output_tokens_per_second: float | None
    requests_per_second: float | None
    sentence: str


DEFAULT_LOAD_LEVELS = (1, 2, 4, 8)
# Chosen for a 2-core CPU as much as for a GB10: a 256-token prompt keeps a level's prefill at a few seconds on
# vLLM-CPU (about 40-400 tok/s of BF16 prefill here), so the default objective separates precisions rather than
# failing every level; 64 output tokens give 63 inter-token gaps per request for the ITL percentiles.
DEFAULT_LOAD_PROMPT_TOKENS = 256
DEFAULT_LOAD_MAX_TOKENS = 64
DEFAULT_LOAD_REPETITIONS = 2
# room in each sequence beyond prompt + output: the request's number, and the spread of a window's tokens
# around the calibrated characters per token (core.server.sweep.Prompts: a window of Python source tokenizes
# denser than the mix; measured here, a 256-token prompt reached 385 tokens before the calibration was spread
# over the text), so half a prompt more, and 64 tokens
LOAD_CONTEXT_MARGIN = 64


@dataclass(frozen=True)
class LoadSweepSpec:
    """A job's load sweep (issue 25): its artifact served by its engine with one slot per stream at the highest
    level (vLLM ``--max-num-seqs``, llama-server ``--parallel``), then concurrency ``levels`` in rising order,
    each with a warm-up and ``repetitions`` timed rounds of unique prompts, under ``plan``'s objective and stop
    rule (core.server.sweep)."""

    levels: tuple[int, ...] = DEFAULT_LOAD_LEVELS
    prompt_tokens: int = DEFAULT_LOAD_PROMPT_TOKENS
    max_tokens: int = DEFAULT_LOAD_MAX_TOKENS
    repetitions: int = DEFAULT_LOAD_REPETITIONS
    plan: LoadPlan = field(default_factory=LoadPlan)
    dropped: tuple[int, ...] = ()  # levels above the plan's capacity at this context, left out before starting
    capacity: int | None = None  # that capacity (sequences of context_tokens), when the levels were capped

    @property
    def context_tokens(self) -> int:
        """Each sequence's context: prompt × 1.5 + output + margin."""
        return self.prompt_tokens + self.prompt_tokens // 2 + self.max_tokens + LOAD_CONTEXT_MARGIN

    @property
    def slots(self) -> int:
        """Sequences the server is started for: the highest level."""
        return max(self.levels) if self.levels else 1

    def timed_tokens(self, pp_factor: float) -> float:
        """The tokens the sweep has the server process, each level's warm-up and rounds, every stream counted
        (an upper bound: batched streams share a step), prompt tokens weighted as the benchmark weighs them
        (÷ ``pp_factor``, prefill being that much faster per token): the ETA's unit with the GiB read per
        token."""
        return sum((self.repetitions + 1) * level * (self.max_tokens + self.prompt_tokens / pp_factor)
                   for level in self.levels)
