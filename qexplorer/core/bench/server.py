"""Benchmark a running server through its OpenAI-compatible API (vLLM, llama-server, SGLang), as llama-benchy does.

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

Quality through the server uses ``logprobs`` with ``echo`` on the reference's
own evaluation chunks: the server returns its top-k log-probabilities for each
prompt token, compared with the local reference's top-k. That KLD is taken
over the union of the two top-k sets with the rest lumped - an approximation,
labelled as such. Which position a server's entry describes is read from the
response itself (see :func:`logprob_alignment`), never chosen by the KLD it
would give.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from qexplorer.core.bench.noise import NoiseProbe, own_tree
from qexplorer.core.domain.bench import Stat
from qexplorer.core.domain.events import JobEvent, Log, Phase, Progress, drive
from qexplorer.core.domain.phases import PhaseKind
from qexplorer.core.domain.record import (
    EngineInfo,
    InterTokenLatency,
    MemoryFigures,
    ModelIdentity,
    Noise,
    RunRecord,
    ServerLevel,
    ServerProcess,
    ServerQuality,
    ServerSweep,
    Speed,
)
from qexplorer.core.domain.spec import ServerSpec
from qexplorer.core.errors import UserError
from qexplorer.core.kinds import Engine, Family, SupportMode

# Ends mid-sentence so that base and instruction-tuned models alike keep writing.
DEFAULT_PROMPT = ("The lighthouse keeper kept two logbooks. The first was official: wind speed, visibility, "
                  "the hours the lamp was lit and the ships that passed. The second was his own, and in it he wrote")


class ServerError(UserError):
    """One sentence about what the server did wrong."""


@dataclass(frozen=True)
class ServerTarget:
    base_url: str
    api_key_env: str | None = None  # the *name* of an environment variable; the key is never stored
    timeout_s: float = 60.0

    @property
    def host(self) -> str:
        return urlparse(self.base_url).netloc or self.base_url

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ServerError(f"The environment variable {self.api_key_env} is empty; set it to the API key.")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def url(self, path: str) -> str:
        base = self.base_url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        return base + path


def _client(target: ServerTarget) -> Any:
    import httpx

    return httpx.Client(timeout=httpx.Timeout(target.timeout_s, connect=min(10.0, target.timeout_s)),
                        headers=target.headers(), trust_env=False)


def _explain(target: ServerTarget, exc: Exception) -> ServerError:
    import httpx

    if isinstance(exc, httpx.ConnectError):
        return ServerError(f"Nothing answers at {target.base_url} (connection refused or unreachable); "
                           "start the server or check the address.")
    if isinstance(exc, httpx.TimeoutException):
        return ServerError(f"{target.base_url} did not answer within {target.timeout_s:g} s.")
    if isinstance(exc, httpx.HTTPStatusError):
        body = exc.response.text[:120].replace("\n", " ")
        return ServerError(f"{target.base_url} answered HTTP {exc.response.status_code}: {body}")
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        return ServerError(f"The connection to {target.base_url} broke off mid-response ({exc}).")
    return ServerError(f"Talking to {target.base_url} failed: {exc}")


def discover_model(target: ServerTarget) -> str:
    """The id of the (first) model the server serves."""
    import httpx

    try:
        with _client(target) as client:
            response = client.get(target.url("/models"))
            response.raise_for_status()
            payload = response.json()
    except httpx.HTTPError as exc:
        raise _explain(target, exc) from None
    except ValueError:
        raise ServerError(f"{target.base_url}/v1/models did not return JSON; is this an OpenAI-compatible server?") from None
    try:
        return str(payload["data"][0]["id"])
    except (KeyError, IndexError, TypeError):
        raise ServerError(f"{target.base_url}/v1/models lists no model.") from None


@dataclass
class StreamTiming:
    """One streamed request: llama-benchy's timestamps."""

    start_s: float
    token_times_s: list[float] = field(default_factory=list)  # each chunk that carried text
    first_response_s: float | None = None  # the first data line of any kind
    end_s: float = 0.0
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None

    @property
    def first_token_s(self) -> float | None:
        return self.token_times_s[0] if self.token_times_s else None

    @property
    def ttft_s(self) -> float | None:
        """e2e_ttft: first token − request start."""
        first = self.first_token_s
        return first - self.start_s if first is not None else None

    @property
    def ttfr_s(self) -> float | None:
        return self.first_response_s - self.start_s if self.first_response_s is not None else None

    @property
    def tokens(self) -> int:
        """Generated tokens: the server's usage count where it gives one, else one per chunk with text."""
        return self.usage_completion_tokens if self.usage_completion_tokens else len(self.token_times_s)

    @property
    def itl_s(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def decode_tok_s(self) -> float | None:
        """tg: (tokens − 1) ÷ (end − first token), as llama-benchy."""
        first = self.first_token_s
        if first is None or self.tokens < 2 or self.end_s <= first:
            return None
        return (self.tokens - 1) / (self.end_s - first)


class Stream:
    """One keep-alive HTTP client, used for every request of one concurrent stream (no TCP connect in TTFT)."""

    def __init__(self, target: ServerTarget) -> None:
        self.target = target
        self.client = _client(target)
        self.extras: dict[str, Any] = {"ignore_eos": True, "stream_options": {"include_usage": True}}
        self.exact = True  # False once the server refused the extras

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.client.close()

    def connect(self) -> float:
        """GET /v1/models; returns the round trip in seconds (the first call also opens the connection)."""
        import httpx

        started = time.perf_counter()
        try:
            self.client.get(self.target.url("/models")).raise_for_status()
        except httpx.HTTPError as exc:
            raise _explain(self.target, exc) from None
        return time.perf_counter() - started

    def complete(self, model: str, prompt: str, max_tokens: int) -> StreamTiming:
        """One streaming completion of exactly ``max_tokens`` where the server takes ``ignore_eos`` +
        ``min_tokens`` (and streams ``usage``); a server that refuses those fields is asked again without them,
        and this stream never sends them again (:attr:`exact` then says so)."""
        import httpx

        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0.0}
        if self.exact:
            body.update(self.extras, min_tokens=max_tokens)
        timing = StreamTiming(start_s=time.perf_counter())
        try:
            with self.client.stream("POST", self.target.url("/completions"), json=body) as response:
                if response.status_code in (400, 422) and self.exact:
                    response.read()
                    self.exact = False
                    return self.complete(model, prompt, max_tokens)
                response.raise_for_status()
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    now = time.perf_counter()
                    if timing.first_response_s is None:
                        timing.first_response_s = now
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    self._chunk(timing, data, now)
        except httpx.HTTPError as exc:
            raise _explain(self.target, exc) from None
        timing.end_s = time.perf_counter()
        if not timing.token_times_s:
            raise ServerError(f"{self.target.base_url} streamed no tokens.")
        return timing

    def _chunk(self, timing: StreamTiming, data: str, now: float) -> None:
        try:
            chunk = json.loads(data)
            usage = chunk.get("usage") or {}
            choices = chunk.get("choices") or []
            text = (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")) if choices else None
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise ServerError(f"{self.target.base_url} sent a malformed stream chunk: {data[:80]!r}") from None
        if usage:
            timing.usage_prompt_tokens = usage.get("prompt_tokens") or timing.usage_prompt_tokens
            timing.usage_completion_tokens = usage.get("completion_tokens") or timing.usage_completion_tokens
        if text:
            timing.token_times_s.append(now)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


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

    def sample(self, chars: int = 2000) -> str:
        return self.text[:chars]

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

    timings: tuple[StreamTiming, ...]
    wall_s: float

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self.timings)

    @property
    def aggregate_tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


def run_level(streams: list[Stream], model: str, prompts: list[str], max_tokens: int) -> LevelRun:
    """One request per stream, all at once; all must succeed."""
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
    if errors:
        raise errors[0] if isinstance(errors[0], UserError) else ServerError(str(errors[0]))
    return LevelRun(tuple(t for t in timings if t is not None), wall)


def _level(concurrency: int, depth: int, pp: int, runs: list[LevelRun], latency_s: float, noise: Noise | None,
           ) -> ServerLevel:
    """llama-benchy's figures from the repetitions of one test (its ``_process_batch``)."""
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
        if concurrency > 1:
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
        itl=InterTokenLatency(1000 * statistics.fmean(itl), 1000 * _percentile(itl, 0.5),
                              1000 * _percentile(itl, 0.99), len(itl)) if itl else None,
        tokens=sum(r.tokens for r in runs), depth=depth,
        prompt_tokens=round(statistics.fmean(reported)) - depth if reported else pp,
        pp_tok_s=Stat.of(pp_speeds) if pp_speeds else None, tg_tok_s=Stat.of(tg_speeds) if tg_speeds else None,
        ttfr_s=Stat.of(ttfr) if ttfr else None, est_ppt_s=Stat.of(est_ppt) if est_ppt else None, noise=noise,
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
          text: str | None = None) -> Generator[JobEvent, None, ServerSweep]:
    """Per depth and concurrency level: a warm-up, then ``repetitions`` timed runs; yields progress, returns the
    sweep (partial on failure)."""
    model = discover_model(target)
    yield Log(f"{target.host} serves {model}")
    prompts = Prompts(text if text is not None else default_text(), unique=unique)
    watcher = ServerWatcher.for_target(target)
    finished: list[ServerLevel] = []
    error = None
    latency_s = 0.0
    exact_output = ""
    usage_seen = False
    total = len(depths) * len(levels) * repetitions
    step = 0
    try:
        with Stream(target) as probe:
            latency_s = measure_latency(probe)
            sample = prompts.sample()
            calibration = probe.complete(model, sample, 1)
            prompts.calibrate(len(sample), calibration.usage_prompt_tokens)
            if calibration.usage_prompt_tokens is None:
                prompts.calibrate(len(sample), _nonstream_prompt_tokens(probe, model, sample))
        for depth in depths:
            for level in levels:
                label = f"concurrency {level}" + (f" at depth {depth}" if depth else "")
                yield Phase(PhaseKind.SERVER, f"{label}: warm-up")
                with contextlib.ExitStack() as opened:
                    streams = [opened.enter_context(Stream(target)) for _ in range(level)]
                    for stream in streams:
                        stream.connect()  # the TCP connection is opened here, outside every timing
                    run_level(streams, model, [prompts.make(depth, prompt_tokens) for _ in streams], min(8, max_tokens))
                    probe_noise = NoiseProbe(measured=lambda: own_tree() | watcher.tree()).start()
                    runs = []
                    for _ in range(repetitions):
                        runs.append(run_level(streams, model, [prompts.make(depth, prompt_tokens) for _ in streams],
                                              max_tokens))
                        step += 1
                        yield Progress(PhaseKind.SERVER, step, total, label)
                    exact_output = _exactness(runs, max_tokens, all(s.exact for s in streams), exact_output)
                    usage_seen |= any(t.usage_completion_tokens for r in runs for t in r.timings)
                tg = [t.decode_tok_s for r in runs for t in r.timings if t.decode_tok_s]
                noise = probe_noise.stop(Stat.of(tg).cv_pct if tg else None)
                finished.append(_level(level, depth, prompt_tokens, runs, latency_s, noise))
    except UserError as exc:
        error = str(exc)  # a half-done sweep keeps what it measured
        yield Log(f"sweep stopped: {exc}", level="warning")
    finally:
        process = watcher.stop()
    counted = "usage.completion_tokens" if usage_seen else "streamed chunks with text"
    return ServerSweep(
        model_id=model, host=target.host, max_tokens=max_tokens, repetitions=repetitions,
        token_count=counted + ("; prompt lengths calibrated on the server's own count" if prompts.calibrated else
                               "; prompt lengths estimated at 4 characters per token (the server reports no usage)"),
        levels=tuple(finished), error=error, latency_ms=1000 * latency_s, prompt_tokens=prompt_tokens,
        depths=tuple(depths), unique_prompts=unique, exact_output=exact_output, process=process,
        process_note=watcher.note,
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


class ServerWatcher:
    """The server's process tree, when it listens on this host: its PID from the port, its peak RSS sampled in a
    thread while the sweep runs."""

    def __init__(self, pid: int | None, note: str | None, interval_s: float = 0.25) -> None:
        self.pid = pid
        self.note = note
        self.name = ""
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None
        if pid is not None:
            import psutil

            try:
                self.name = psutil.Process(pid).name()
            except psutil.Error:
                self.name = "?"
            self._thread = threading.Thread(target=self._watch, args=(interval_s,), daemon=True)
            self._thread.start()

    @staticmethod
    def for_target(target: ServerTarget) -> ServerWatcher:
        pid, note = server_pid(target)
        return ServerWatcher(pid, note)

    def tree(self) -> set[int]:
        return own_tree(self.pid) if self.pid is not None else set()

    def _watch(self, interval_s: float) -> None:
        from qexplorer.core.proc import tree_rss

        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid)[0])
            self._stop.wait(interval_s)

    def stop(self) -> ServerProcess | None:
        if self._thread is None or self.pid is None:
            return None
        self._stop.set()
        self._thread.join(timeout=2)
        return ServerProcess(pid=self.pid, name=self.name, peak_rss_bytes=self.peak or None,
                             note="RSS of the server's process tree, sampled every 0.25 s during the sweep")


def server_pid(target: ServerTarget) -> tuple[int | None, str | None]:
    """The PID listening on the target's port when the host is this machine; else None and why."""
    import ipaddress
    import socket

    import psutil

    parsed = urlparse(target.base_url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except OSError:
        return None, f"{host} does not resolve here, so the server's memory is not measured"
    local = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    if not any(ipaddress.ip_address(a.split("%")[0]).is_loopback or a in local for a in addresses):
        return None, f"{host} is another machine: its memory is not measured"
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid, None
    except psutil.AccessDenied:
        return None, "no permission to see which process listens on the port (run as its user to measure it)"
    return None, f"no process of this user listens on port {port}, so the server's memory is not measured"


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


def server_quality(target: ServerTarget, model_id: str, reference: Any, tokenizer: Any, top_k: int = 10,
                   max_chunks: int = 2) -> Generator[JobEvent, None, ServerQuality]:
    """Approximate KLD and top-1 agreement from the server's echoed prompt log-probabilities."""
    import httpx
    import numpy as np

    from qexplorer.core.quality import Chunking, TopkScorer

    meta, arrays = reference
    chunking = Chunking(meta.ctx, meta.n_chunks, meta.bos_id)
    first, per = chunking.first_scored, chunking.scored_per_chunk
    piece_to_id: dict[str, int] = {}
    for token_id in range(meta.vocab_size):
        piece_to_id.setdefault(tokenizer.decode([token_id]), token_id)
    scorer = TopkScorer()
    offset: int | None = None
    chunks = min(max_chunks, meta.n_chunks)
    with _client(target) as client:
        for index in range(chunks):
            ids = [int(t) for t in arrays["chunks"][index]]
            body = {"model": model_id, "prompt": tokenizer.decode(ids), "max_tokens": 1, "echo": True,
                    "logprobs": top_k, "temperature": 0.0}
            try:
                response = client.post(target.url("/completions"), json=body)
                response.raise_for_status()
                logprobs = response.json()["choices"][0]["logprobs"]
                tokens, tops = logprobs["tokens"], logprobs["top_logprobs"]
            except httpx.HTTPError as exc:
                raise _explain(target, exc) from None
            except (ValueError, KeyError, IndexError, TypeError):
                raise ServerError(f"{target.base_url} returned no prompt log-probabilities (echo + logprobs); "
                                  "quality cannot be measured through it.") from None
            expected = [tokenizer.decode([i]) for i in ids]
            if tokens[: len(expected)] != expected:
                raise ServerError("The server tokenizes the evaluation text differently from the local reference; "
                                  "quality through the server was not computed.")
            rows = slice(index * per, (index + 1) * per)
            ref_ids = np.asarray(arrays["topk_ids"][rows])
            ref_logp = np.asarray(arrays["topk_logp"][rows], dtype=np.float64)
            ref_top1 = np.asarray(arrays["top1"][rows])
            if offset is None:
                offset = logprob_alignment(tokens, tops, top_k)
            for j in range(per):
                position = first + j + offset
                top = (tops[position] if position < len(tops) else None) or {}
                ranked = sorted(top.items(), key=lambda kv: kv[1], reverse=True)[:top_k]
                q = {piece_to_id[s]: lp for s, lp in ranked if s in piece_to_id}
                scorer.add(q, max(q, key=q.get) if q else None, ref_ids[j], ref_logp[j], ref_top1[j])
            yield Progress(PhaseKind.SERVER_QUALITY, index + 1, chunks, f"chunk {index + 1}/{chunks}")
    return scorer.result(top_k, f"KLD over the server's top-{top_k} (shared with the reference's top-{meta.top_k}) "
                                "plus one lumped bucket: a lower bound",
                         "OpenAI (entry i predicts token i)" if offset == 1 else
                         "shifted (entry i predicts token i + 1, as llama-cpp-python's server does)")


def logprob_alignment(tokens: list[str], tops: list[Any], top_k: int) -> int:
    """Which token an echoed ``top_logprobs`` entry predicts, read from the response: 1 when entry i is the
    distribution *for* token i (OpenAI's semantics, vLLM), 0 when it is the distribution *after* token i
    (llama-cpp-python's server).

    The test is the server's own self-consistency: under the right reading, the token that really comes next
    is among the k most likely entries at most positions of real text; under the wrong one, it is there about as
    often as any token is in an unrelated distribution. Servers also add the echoed token's own entry to
    each dict, so only the ``top_k`` highest entries count."""

    def hit(entry: Any, token: str) -> bool:
        ranked = sorted((entry or {}).items(), key=lambda kv: kv[1], reverse=True)[:top_k]
        return any(piece == token for piece, _ in ranked)

    n = min(len(tokens), len(tops)) - 1
    if n < 8:
        raise ServerError("The server returned too few prompt log-probabilities to tell how they are aligned.")
    same = sum(hit(tops[i], tokens[i]) for i in range(1, n + 1)) / n
    after = sum(hit(tops[i], tokens[i + 1]) for i in range(0, n)) / n
    if max(same, after) < 0.2 or abs(same - after) < 0.1:
        raise ServerError(f"The server's echoed log-probabilities fit neither alignment (the next token is in its "
                          f"top-{top_k} at {100 * same:.0f} % / {100 * after:.0f} % of positions); quality "
                          "through it was not computed.")
    return 1 if same > after else 0


def run_server_spec(spec: ServerSpec, on_event: Callable[[JobEvent], None]) -> RunRecord:
    """A queued server job (:class:`~qexplorer.core.jobs.queue.JobQueue`): the sweep, as a record."""
    target = ServerTarget(spec.url, api_key_env=spec.api_key_env, timeout_s=spec.timeout_s)
    return record_from_sweep(drive(sweep(target, spec.levels, spec.repetitions, spec.max_tokens,
                                         prompt_tokens=spec.prompt_tokens, depths=spec.depths, unique=spec.unique),
                                   on_event))
