"""The client half of talking to an OpenAI-compatible server: where it is (:class:`ServerTarget`, its API key
read from the environment only), one keep-alive streaming client per stream with llama-benchy's timings
(:class:`Stream`, :class:`StreamTiming`), the served model's name, and every transport failure as one sentence
(:class:`ServerError`)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from qexplorer.core.errors import UserError


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


def open_client(target: ServerTarget) -> Any:
    import httpx

    return httpx.Client(timeout=httpx.Timeout(target.timeout_s, connect=min(10.0, target.timeout_s)),
                        headers=target.headers(), trust_env=False)


def explain(target: ServerTarget, exc: Exception) -> ServerError:
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
        with open_client(target) as client:
            response = client.get(target.url("/models"))
            response.raise_for_status()
            payload = response.json()
    except httpx.HTTPError as exc:
        raise explain(target, exc) from None
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
        self.client = open_client(target)
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
            raise explain(self.target, exc) from None
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
                if response.status_code >= 400:
                    response.read()  # the error's body, for explain(); a stream's is unread until asked
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
            raise explain(self.target, exc) from None
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
