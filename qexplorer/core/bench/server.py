"""Benchmark a running server through its OpenAI-compatible API (vLLM, llama-server, SGLang).

qexplorer does not serve models; it measures the engine the user runs, so that
local and served numbers sit in one table. With streaming completions it
measures, per request, the time to first token (TTFT), the inter-token latency
(ITL: mean, p50, p99) and the decode rate of the stream; per concurrency level,
the aggregate tokens/s of all streams together. A warm-up request precedes each
level; each level is repeated. Every failure is one sentence, and a sweep cut
short keeps the levels it finished.

Tokens are counted as streamed chunks that carry text (servers send one token
per chunk when streaming); the count is reported with the result.

Quality through the server uses ``logprobs`` with ``echo`` on the reference's
own evaluation chunks: the server returns its top-k log-probabilities for each
prompt token, compared with the local reference's top-k. That KLD is taken
over the union of the two top-k sets with the rest lumped - an approximation,
labelled as such.
"""

from __future__ import annotations

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

from qexplorer.core.bench import Stat
from qexplorer.core.errors import UserError
from qexplorer.core.jobs.events import JobEvent, Log, Phase, Progress, drive
from qexplorer.core.jobs.record import (
    EngineInfo,
    InterTokenLatency,
    ModelIdentity,
    RunRecord,
    ServerLevel,
    ServerQuality,
    ServerSweep,
    Speed,
)
from qexplorer.core.jobs.spec import ServerSpec
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
    start_s: float
    token_times_s: list[float] = field(default_factory=list)
    end_s: float = 0.0

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.start_s if self.token_times_s else None

    @property
    def itl_s(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def decode_tok_s(self) -> float | None:
        t = self.token_times_s
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else None


def stream_completion(target: ServerTarget, model: str, prompt: str, max_tokens: int) -> StreamTiming:
    """One streaming completion; timestamps each chunk that carries text."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0.0}
    timing = StreamTiming(start_s=time.perf_counter())
    try:
        with _client(target) as client, client.stream("POST", target.url("/completions"), json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                    text = chunk["choices"][0].get("text") or chunk["choices"][0].get("delta", {}).get("content")
                except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                    raise ServerError(f"{target.base_url} sent a malformed stream chunk: {data[:80]!r}") from None
                if text:
                    timing.token_times_s.append(time.perf_counter())
    except httpx.HTTPError as exc:
        raise _explain(target, exc) from None
    timing.end_s = time.perf_counter()
    if not timing.token_times_s:
        raise ServerError(f"{target.base_url} streamed no tokens.")
    return timing


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def run_level(target: ServerTarget, model: str, concurrency: int, prompt: str, max_tokens: int) -> LevelRun:
    """``concurrency`` streams at once; all must succeed."""
    timings: list[StreamTiming | None] = [None] * concurrency
    errors: list[Exception] = []

    def one(index: int) -> None:
        try:
            timings[index] = stream_completion(target, model, prompt, max_tokens)
        except Exception as exc:  # collected and re-raised as one sentence below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0] if isinstance(errors[0], UserError) else ServerError(str(errors[0]))
    done = [t for t in timings if t is not None]
    tokens = sum(len(t.token_times_s) for t in done)
    return LevelRun(tokens=tokens, aggregate_tok_s=tokens / wall if wall > 0 else 0.0,
                    ttft_s=[t.ttft_s for t in done if t.ttft_s is not None],
                    decode_tok_s=[t.decode_tok_s for t in done if t.decode_tok_s],
                    itl_s=[x for t in done for x in t.itl_s])


@dataclass(frozen=True)
class LevelRun:
    """One repetition of one concurrency level."""

    tokens: int
    aggregate_tok_s: float
    ttft_s: list[float]
    decode_tok_s: list[float]
    itl_s: list[float]


def sweep(target: ServerTarget, levels: tuple[int, ...] = (1, 4, 16), repetitions: int = 3, max_tokens: int = 64,
          prompt: str = DEFAULT_PROMPT) -> Generator[JobEvent, None, ServerSweep]:
    """Warm-up and repetitions per level; yields progress, returns the sweep (partial on failure)."""
    model = discover_model(target)
    yield Log(f"{target.host} serves {model}")
    finished: list[ServerLevel] = []
    error = None
    total = len(levels) * repetitions
    step = 0
    try:
        for level in levels:
            yield Phase("server", f"concurrency {level}: warm-up")
            run_level(target, model, 1, prompt, min(8, max_tokens))
            runs = []
            for _ in range(repetitions):
                runs.append(run_level(target, model, level, prompt, max_tokens))
                step += 1
                yield Progress("server", step, total, f"concurrency {level}")
            ttft = [x for r in runs for x in r.ttft_s]
            itl = [x for r in runs for x in r.itl_s]
            per_stream = [x for r in runs for x in r.decode_tok_s]
            finished.append(ServerLevel(
                concurrency=level, aggregate_tok_s=Stat.of([r.aggregate_tok_s for r in runs]),
                decode_tok_s_per_stream=Stat.of(per_stream) if per_stream else None,
                ttft_s=Stat.of(ttft) if ttft else None,
                itl=InterTokenLatency(1000 * statistics.fmean(itl), 1000 * _percentile(itl, 0.5),
                                      1000 * _percentile(itl, 0.99), len(itl)) if itl else None,
                tokens=sum(r.tokens for r in runs),
            ))
    except UserError as exc:
        error = str(exc)  # a half-done sweep keeps what it measured
        yield Log(f"sweep stopped: {exc}", level="warning")
    return ServerSweep(model_id=model, host=target.host, max_tokens=max_tokens, repetitions=repetitions,
                       token_count="streamed chunks with text", levels=tuple(finished), error=error)


def record_from_sweep(sweep_result: ServerSweep) -> RunRecord:
    """A results-store record: concurrency 1 fills the speed figures; every level is kept."""
    first = sweep_result.single_stream
    speed = None
    if first is not None and first.decode_tok_s_per_stream is not None:
        empty = Stat(0.0, 0.0, 0)
        speed = Speed(prefill_tok_s=empty, decode_tok_s=first.decode_tok_s_per_stream,
                      ttft_s=first.ttft_s or empty, prompt_tokens=0, gen_tokens=sweep_result.max_tokens,
                      repetitions=sweep_result.repetitions, threads=0)
    return RunRecord(
        model=ModelIdentity(name=f"{sweep_result.model_id} @ {sweep_result.host}",
                            path=f"server://{sweep_result.host}/{sweep_result.model_id}"),
        precision="server", precision_label=f"server {sweep_result.host}", family=Family.SERVER,
        engine=EngineInfo(name=Engine.OPENAI_API, mode=SupportMode.SERVED, device="server"),
        speed=speed, server=sweep_result,
    )


def server_quality(target: ServerTarget, model_id: str, reference: Any, tokenizer: Any, top_k: int = 10,
                   max_chunks: int = 2) -> Generator[JobEvent, None, ServerQuality]:
    """Approximate KLD and top-1 agreement from the server's echoed prompt log-probabilities."""
    import httpx
    import numpy as np

    meta, arrays = reference
    first, per = meta.ctx // 2, meta.ctx - 1 - meta.ctx // 2
    piece_to_id: dict[str, int] = {}
    for token_id in range(meta.vocab_size):
        piece_to_id.setdefault(tokenizer.decode([token_id]), token_id)
    klds: list[float] = []
    agree: list[bool] = []
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
                # OpenAI semantics put P(token i | tokens < i) at entry i; llama-cpp-python's server puts the
                # distribution after token i there. The first chunk decides which fits the reference.
                scores = {o: _score(tops, piece_to_id, ref_ids, ref_logp, ref_top1, first, per, o) for o in (1, 0)}
                offset = min(scores, key=lambda o: statistics.fmean(scores[o][0]) if scores[o][0] else math.inf)
            chunk_kld, chunk_agree = _score(tops, piece_to_id, ref_ids, ref_logp, ref_top1, first, per, offset)
            klds += chunk_kld
            agree += chunk_agree
            yield Progress("server-quality", index + 1, chunks, f"chunk {index + 1}/{chunks}")
    n = len(klds)
    return ServerQuality(
        kld_mean=statistics.fmean(klds) if klds else None, n_positions=n, top_k=top_k,
        same_top1_pct=100.0 * sum(agree) / n if n else None,
        same_top1_se_pct=100.0 * math.sqrt((sum(agree) / n) * (1 - sum(agree) / n) / n) if n else None,
        approximation=f"KLD over the server's top-{top_k} (shared with the reference's top-{meta.top_k}) "
                      "plus one lumped bucket: a lower bound",
        logprob_alignment="OpenAI (entry i predicts token i)" if offset == 1 else
                          "shifted (entry i predicts token i + 1, as llama-cpp-python's server does)",
    )


def _score(tops: list[Any], piece_to_id: dict[str, int], ref_ids: Any, ref_logp: Any, ref_top1: Any, first: int,
           per: int, offset: int) -> tuple[list[float], list[bool]]:
    import numpy as np

    from qexplorer.core.quality import coarse_kld

    klds: list[float] = []
    agree: list[bool] = []
    for j in range(per):
        index = first + j + offset
        top = (tops[index] if index < len(tops) else None) or {}
        q = {piece_to_id[s]: lp for s, lp in top.items() if s in piece_to_id}
        if not q:
            continue
        p = dict(zip(ref_ids[j].tolist(), ref_logp[j].tolist(), strict=True))
        shared = [i for i in q if i in p]
        # the same coarsened KL as local candidates: shared outcomes plus one lumped bucket
        klds.append(float(coarse_kld(np.array([[p[i] for i in shared]]), np.array([[q[i] for i in shared]]))[0]))
        agree.append(max(q, key=q.get) == int(ref_top1[j]))
    return klds, agree


def run_server_spec(spec: ServerSpec, on_event: Callable[[JobEvent], None]) -> RunRecord:
    """A queued server job (:class:`~qexplorer.core.jobs.queue.JobQueue`): the sweep, as a record."""
    target = ServerTarget(spec.url, api_key_env=spec.api_key_env, timeout_s=spec.timeout_s)
    return record_from_sweep(drive(sweep(target, spec.levels, spec.repetitions, spec.max_tokens), on_event))
