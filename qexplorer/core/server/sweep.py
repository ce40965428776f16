"""The sweep: a running server (vLLM, llama-server, SGLang) measured through its OpenAI-compatible API, as
llama-benchy does.

qexplorer does not serve models; it measures the engine the user runs, so that
local and served numbers sit in one table. The method and the names follow
llama-benchy (the benchmark GB10 owners share), on ``/v1/completions``:

* latency: the mean round trip of three ``GET /v1/models`` on an open connection;
* per depth ``d`` and concurrency ``c``: one keep-alive client per stream (the
  TCP connect is never inside a timing), a warm-up request, then
  ``repetitions`` runs of ``c`` simultaneous streamed requests, each prompt
  ``d`` tokens of context then ``pp`` tokens, cut from the evaluation text and
  unique per request (a number and its own window of the text first, so no
  prefix of it is in the server's cache) unless a prefix-cache test asks for
  the same prompt every time;
* output held at ``max_tokens`` with ``ignore_eos`` + ``min_tokens`` (a server
  that refuses them is asked without, and the sweep says the length varied);
  token counts from ``usage`` (``stream_options.include_usage``) where the
  server sends it, else one per streamed chunk with text - the sweep says which;
* ``ttfr`` (first response of any kind), ``est_ppt`` = ttfr − latency,
  ``e2e_ttft`` (first token), pp t/s = (d + pp) ÷ est_ppt, tg t/s =
  (tokens − 1) ÷ (end − first token); above concurrency 1 both are the batch's
  totals, as llama-benchy's "t/s (total)";
* what none of the anchors has: the server's own memory when it runs on this
  host (the PID listening on the port, its process tree's RSS sampled during
  the sweep), the noise of the host while each test ran, and quality.

Every failure is one sentence, and a sweep cut short keeps the tests it finished.

Quality through the server is :mod:`qexplorer.core.server.quality`.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

from qexplorer.core.bench.noise import NoiseProbe, own_tree
from qexplorer.core.domain.bench import Stat
from qexplorer.core.domain.events import Cancelled, JobEvent, Log, Phase, Progress, drive
from qexplorer.core.domain.load import LoadPlan, LoadSweepSpec, ServerMetrics
from qexplorer.core.domain.phases import PhaseKind
from qexplorer.core.domain.record import (
    EngineInfo,
    InterTokenLatency,
    MemoryFigures,
    ModelIdentity,
    Noise,
    RunRecord,
    ServerLevel,
    ServerSweep,
    Speed,
)
from qexplorer.core.domain.spec import ServerSpec
from qexplorer.core.errors import UserError
from qexplorer.core.kinds import Engine, Family, SupportMode
from qexplorer.core.server.client import (
    ServerError,
    ServerTarget,
    Stream,
    StreamTiming,
    discover_model,
)
from qexplorer.core.server.load import goodput, level_load, percentile, stop_reason
from qexplorer.core.server.metrics import MetricsScraper
from qexplorer.core.server.watch import ServerWatcher


class Prompts:
    """Prompts of about ``tokens`` tokens cut from the evaluation text, unique per request unless ``unique`` is off.

    A unique prompt starts with its own request number and its own window of the text, so that no prefix of it
    is in the server's cache (llama-server, vLLM and llama-cpp-python all reuse the longest cached prefix: the
    same prompt twice measures the cache, not prompt processing). Lengths come from characters per token,
    calibrated on this server's tokenizer by one request's ``usage.prompt_tokens`` (a fallback of 4 characters
    per token when the server reports no usage; the token counts recorded are then estimates and say so)."""

    def __init__(self, text: str, unique: bool = True) -> None:
        self.text = " ".join(text.split())  # one line: no chat-template surprises, no runs of blank lines
        self.unique = unique
        self.chars_per_token = 4.0
        self.calibrated = False
        self._count = 0

    def calibrate(self, prompt_chars: int, prompt_tokens: int | None) -> None:
        if prompt_tokens:
            self.chars_per_token = prompt_chars / prompt_tokens
            self.calibrated = True

    def sample(self, chars: int = 2000, windows: int = 4) -> str:
        """About ``chars`` characters for the calibration request: ``windows`` pieces spread over the text, so
        the characters per token it measures are the mix the prompts are cut from (the default text is short
        prose then Python source, which tokenizes denser)."""
        step = max(1, len(self.text) // windows)
        piece = max(1, chars // windows)
        return " ".join(self.text[i * step:i * step + piece] for i in range(windows))

    def make(self, depth: int, tokens: int) -> str:
        """The context (``depth`` tokens) then the prompt (``tokens``): one completion prompt."""
        chars = int((depth + tokens) * self.chars_per_token)
        index = self._count if self.unique else 0
        self._count += 1
        tag = f"[{index}] " if self.unique else ""
        start = (index * 997) % max(1, len(self.text))
        body = ""
        while len(body) < chars:
            body += self.text[start:] + " "
            start = 0
        return (tag + body)[:max(chars, len(tag) + 1)]


@dataclass(frozen=True)
class LevelRun:
    """One repetition of one depth × concurrency test."""

    timings: tuple[StreamTiming, ...]  # the requests that succeeded
    wall_s: float
    errors: tuple[str, ...] = ()  # one sentence per failed request (a load sweep counts them)

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self.timings)

    @property
    def aggregate_tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


def run_level(streams: list[Stream], model: str, prompts: list[str], max_tokens: int,
              keep_errors: bool = False) -> LevelRun:
    """One request per stream, all at once; all must succeed, unless ``keep_errors`` (a load sweep), which
    returns the failures' sentences with the requests that succeeded."""
    timings: list[StreamTiming | None] = [None] * len(streams)
    errors: list[Exception] = []

    def one(index: int) -> None:
        try:
            timings[index] = streams[index].complete(model, prompts[index], max_tokens)
        except Exception as exc:  # collected and re-raised as one sentence below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(streams))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors and not keep_errors:
        raise errors[0] if isinstance(errors[0], UserError) else ServerError(str(errors[0]))
    return LevelRun(tuple(t for t in timings if t is not None), wall, tuple(str(e) for e in errors))


def _level(concurrency: int, depth: int, pp: int, runs: list[LevelRun], latency_s: float, noise: Noise | None,
           server_metrics: ServerMetrics | None = None) -> ServerLevel:
    """llama-benchy's figures from the repetitions of one test (its ``_process_batch``), and the load figures
    (percentiles, rates, errors) of :func:`~qexplorer.core.server.load.level_load`."""
    pp_speeds, tg_speeds, ttfr, est_ppt, e2e, per_stream = [], [], [], [], [], []
    for run in runs:
        for t in run.timings:
            prompt = _prompt_count(t, depth + pp)
            if t.ttfr_s is not None:
                ttfr.append(t.ttfr_s)
                est = max(0.0, t.ttfr_s - latency_s)
                est_ppt.append(est)
                if concurrency == 1 and est > 0:
                    pp_speeds.append(prompt / est)
            if t.ttft_s is not None:
                e2e.append(t.ttft_s)
            if t.decode_tok_s:
                per_stream.append(t.decode_tok_s)
        if concurrency > 1 and run.timings:
            starts = min(t.start_s for t in run.timings)
            firsts = [t.first_token_s for t in run.timings if t.first_token_s is not None]
            ends = max(t.end_s for t in run.timings)
            if firsts and max(firsts) > starts:
                pp_speeds.append(sum(_prompt_count(t, depth + pp) for t in run.timings) / (max(firsts) - starts))
            if firsts and ends > min(firsts) and run.tokens > len(run.timings):
                tg_speeds.append((run.tokens - len(run.timings)) / (ends - min(firsts)))
    if concurrency == 1:
        tg_speeds = per_stream
    itl = [x for r in runs for t in r.timings for x in t.itl_s]
    reported = [t.usage_prompt_tokens for r in runs for t in r.timings if t.usage_prompt_tokens]
    return ServerLevel(
        concurrency=concurrency, aggregate_tok_s=Stat.of([r.aggregate_tok_s for r in runs]),
        decode_tok_s_per_stream=Stat.of(per_stream) if per_stream else None, ttft_s=Stat.of(e2e) if e2e else None,
        itl=InterTokenLatency(1000 * statistics.fmean(itl), 1000 * percentile(itl, 0.5),
                              1000 * percentile(itl, 0.99), len(itl), 1000 * percentile(itl, 0.9)) if itl else None,
        tokens=sum(r.tokens for r in runs), depth=depth,
        prompt_tokens=round(statistics.fmean(reported)) - depth if reported else pp,
        pp_tok_s=Stat.of(pp_speeds) if pp_speeds else None, tg_tok_s=Stat.of(tg_speeds) if tg_speeds else None,
        ttfr_s=Stat.of(ttfr) if ttfr else None, est_ppt_s=Stat.of(est_ppt) if est_ppt else None, noise=noise,
        load=level_load([t for r in runs for t in r.timings], sum(r.wall_s for r in runs),
                        [e for r in runs for e in r.errors]),
        server_metrics=server_metrics,
    )


def _prompt_count(timing: StreamTiming, expected: int) -> int:
    """The server's prompt-token count when it gives one within 20 % of what was asked (llama-benchy's rule)."""
    reported = timing.usage_prompt_tokens
    return reported if reported and abs(reported - expected) < 0.2 * expected else expected


def measure_latency(stream: Stream, probes: int = 3) -> float:
    """llama-benchy's "api" latency: the mean round trip of GET /v1/models on an open connection."""
    stream.connect()
    return statistics.fmean(stream.connect() for _ in range(probes))


def sweep(target: ServerTarget, levels: tuple[int, ...] = (1, 4, 16), repetitions: int = 3, max_tokens: int = 64,
          *, prompt_tokens: int = 128, depths: tuple[int, ...] = (0,), unique: bool = True,
          text: str | None = None, load: LoadPlan | None = None, phase: PhaseKind = PhaseKind.SERVER,
          ) -> Generator[JobEvent, None, ServerSweep]:
    """Per depth and concurrency level: a warm-up, then ``repetitions`` timed runs; yields progress, returns the
    sweep (partial on failure). The server's ``/metrics`` is scraped during each level when it has one.

    With ``load`` (a load sweep), the levels run in rising order, a failed request is counted instead of ending
    the sweep, the stop rule ends a depth's levels early (and says why), and the goodput under the objective is
    found per depth (:mod:`qexplorer.core.server.load`)."""
    if load is not None:
        levels = tuple(sorted(set(levels)))
    model = discover_model(target)
    yield Log(f"{target.host} serves {model}")
    prompts = Prompts(text if text is not None else default_text(), unique=unique)
    watcher = ServerWatcher.for_target(target)
    scraper = MetricsScraper(target, load.metrics_interval_s if load is not None else 0.5)
    finished: list[ServerLevel] = []
    stops: list[str] = []
    error = None
    latency_s = 0.0
    exact_output = ""
    usage_seen = False
    total = len(depths) * len(levels) * repetitions
    step = 0
    try:
        with Stream(target) as probe:
            latency_s = measure_latency(probe)
            # about one prompt's worth of text: a server started for short sequences (a job's llama-server, one
            # slot per stream of prompt + output) refuses a longer request than its context
            sample = prompts.sample(min(2000, 4 * max(prompt_tokens, 16)))
            calibration = probe.complete(model, sample, 1)
            prompts.calibrate(len(sample), calibration.usage_prompt_tokens)
            if calibration.usage_prompt_tokens is None:
                prompts.calibrate(len(sample), _nonstream_prompt_tokens(probe, model, sample))
        if scraper.interval_s > 0 and not scraper.probe():
            yield Log(scraper.note or "no /metrics")
        for depth in depths:
            at_depth: list[ServerLevel] = []
            for index, level in enumerate(levels):
                label = f"concurrency {level}" + (f" at depth {depth}" if depth else "")
                yield Phase(phase, f"{label}: warm-up")
                with contextlib.ExitStack() as opened:
                    streams = [opened.enter_context(Stream(target)) for _ in range(level)]
                    for stream in streams:
                        stream.connect()  # the TCP connection is opened here, outside every timing
                    run_level(streams, model, [prompts.make(depth, prompt_tokens) for _ in streams], min(8, max_tokens),
                              keep_errors=load is not None)
                    probe_noise = NoiseProbe(measured=lambda: own_tree() | watcher.tree()).start()
                    scraper.start_level()
                    runs = []
                    try:
                        for _ in range(repetitions):
                            runs.append(run_level(streams, model, [prompts.make(depth, prompt_tokens) for _ in streams],
                                                  max_tokens, keep_errors=load is not None))
                            step += 1
                            yield Progress(phase, step, total, label)
                    finally:
                        server_metrics = scraper.stop_level()
                    if any(r.timings for r in runs):
                        exact_output = _exactness(runs, max_tokens, all(s.exact for s in streams), exact_output)
                    usage_seen |= any(t.usage_completion_tokens for r in runs for t in r.timings)
                tg = [t.decode_tok_s for r in runs for t in r.timings if t.decode_tok_s]
                noise = probe_noise.stop(Stat.of(tg).cv_pct if tg else None)
                measured = _level(level, depth, prompt_tokens, runs, latency_s, noise, server_metrics)
                finished.append(measured)
                at_depth.append(measured)
                if load is not None and index < len(levels) - 1:
                    reason = stop_reason(at_depth, load.stop, load.objective)
                    if reason is not None:
                        skipped = ", ".join(str(c) for c in levels[index + 1:])
                        stops.append(reason + (f" (depth {depth})" if depth else "") + f"; concurrency {skipped} "
                                     "not run")
                        yield Log(stops[-1], level="warning")
                        total -= (len(levels) - index - 1) * repetitions
                        break
    except UserError as exc:
        error = str(exc)  # a half-done sweep keeps what it measured
        yield Log(f"sweep stopped: {exc}", level="warning")
    finally:
        process = watcher.stop()
        scraper.close()
    counted = "usage.completion_tokens" if usage_seen else "streamed chunks with text"
    return ServerSweep(
        model_id=model, host=target.host, max_tokens=max_tokens, repetitions=repetitions,
        token_count=counted + ("; prompt lengths calibrated on the server's own count" if prompts.calibrated else
                               "; prompt lengths estimated at 4 characters per token (the server reports no usage)"),
        levels=tuple(finished), error=error, latency_ms=1000 * latency_s, prompt_tokens=prompt_tokens,
        depths=tuple(depths), unique_prompts=unique, exact_output=exact_output, process=process,
        process_note=watcher.note, load_plan=load, stopped_early="; ".join(stops) or None,
        goodput=tuple(goodput(finished, load.objective, depth) for depth in depths
                      if any(lv.depth == depth for lv in finished)) if load is not None else (),
        metrics_note=scraper.note,
    )


def _exactness(runs: list[LevelRun], max_tokens: int, asked: bool, before: str) -> str:
    counts = [t.tokens for r in runs for t in r.timings]
    if counts and min(counts) == max(counts) == max_tokens:
        now = "exact: ignore_eos + min_tokens" if asked else "exact, although the server refused ignore_eos"
    elif asked:
        now = f"not exact: {min(counts)}-{max(counts)} tokens although ignore_eos + min_tokens were sent"
    else:
        now = (f"not exact: the server refused ignore_eos / min_tokens; {min(counts)}-{max(counts)} tokens "
               "per request")
    return now if not before else before if now in before.split("; ") else before + "; " + now


def _nonstream_prompt_tokens(stream: Stream, model: str, prompt: str) -> int | None:
    """The prompt's token count from a non-streamed completion's usage (servers that stream none)."""
    import httpx

    try:
        response = stream.client.post(stream.target.url("/completions"),
                                      json={"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0})
        response.raise_for_status()
        return int(response.json()["usage"]["prompt_tokens"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def default_text() -> str:
    from qexplorer.core.quality import default_corpus

    return default_corpus(200_000).text


def _speed(level: ServerLevel, sweep_result: ServerSweep) -> Speed:
    """A single-stream test as a store ``Speed`` (its per-stream decode; pp and TTFT as llama-benchy measured)."""
    empty = Stat(0.0, 0.0, 0)
    return Speed(prefill_tok_s=level.pp_tok_s or empty, decode_tok_s=level.decode_tok_s_per_stream,
                 ttft_s=level.ttft_s or empty, prompt_tokens=level.prompt_tokens, gen_tokens=sweep_result.max_tokens,
                 repetitions=sweep_result.repetitions, threads=0, depth=level.depth, noise=level.noise)


def record_from_sweep(sweep_result: ServerSweep) -> RunRecord:
    """A results-store record: concurrency 1 at the first depth fills the speed figures; every test is kept."""
    first = next((lv for lv in sweep_result.levels if lv.concurrency == 1 and lv.depth == sweep_result.depths[0]),
                 sweep_result.single_stream)
    speed = _speed(first, sweep_result) if first is not None and first.decode_tok_s_per_stream is not None else None
    depth_speeds = tuple(_speed(lv, sweep_result) for lv in sweep_result.levels
                         if lv.concurrency == 1 and lv is not first and lv.decode_tok_s_per_stream is not None)
    process = sweep_result.process
    return RunRecord(
        model=ModelIdentity(name=f"{sweep_result.model_id} @ {sweep_result.host}",
                            path=f"server://{sweep_result.host}/{sweep_result.model_id}"),
        precision="server", precision_label=f"server {sweep_result.host}", family=Family.SERVER,
        engine=EngineInfo(name=Engine.OPENAI_API, mode=SupportMode.SERVED, device="server"),
        memory=MemoryFigures(peak_rss_bytes=process.peak_rss_bytes if process else None),
        speed=speed, depth_speeds=depth_speeds, server=sweep_result,
    )


def run_server_spec(spec: ServerSpec, on_event: Callable[[JobEvent], None]) -> RunRecord:
    """A queued server job (:class:`~qexplorer.core.jobs.queue.JobQueue`): the sweep, as a record."""
    target = ServerTarget(spec.url, api_key_env=spec.api_key_env, timeout_s=spec.timeout_s)
    return record_from_sweep(drive(sweep(target, spec.levels, spec.repetitions, spec.max_tokens,
                                         prompt_tokens=spec.prompt_tokens, depths=spec.depths, unique=spec.unique,
                                         load=spec.load),
                                   on_event))


def job_load_sweep(base_url: str, spec: LoadSweepSpec, text: str | None = None, timeout_s: float = 600.0,
                   ) -> Generator[JobEvent, None, ServerSweep | None]:
    """A job's load sweep (JobSpec.load) against the server its engine started: the sweep in load mode, its
    levels announced as the job's LOAD_SWEEP phase (timed, alone). A failure keeps what the job measured
    before: the sweep keeps its finished levels, and anything else is one warning and no sweep."""
    if spec.dropped:
        yield Log(f"load levels {', '.join(map(str, spec.dropped))} left out: above the plan's capacity of "
                  f"{spec.capacity} sequences of {spec.context_tokens} tokens", level="warning")
    try:
        return (yield from sweep(ServerTarget(base_url, timeout_s=timeout_s), spec.levels, spec.repetitions,
                                 spec.max_tokens, prompt_tokens=spec.prompt_tokens, text=text, load=spec.plan,
                                 phase=PhaseKind.LOAD_SWEEP))
    except Cancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - the job's other figures stand; the reason is logged
        reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        yield Log(f"The load sweep failed and is left out; the benchmark is kept: {reason}", level="warning")
        return None
