"""The server's own view during a level: its Prometheus ``/metrics`` scraped in a thread (every 0.5 s by
default) and reduced to :class:`~qexplorer.core.domain.load.ServerMetrics`.

The names each engine exports sit in one registry (:data:`ENGINES`), read from their sources:

* vLLM, ``vllm/v1/metrics/loggers.py`` (``PrometheusStatLogger``): gauges ``vllm:kv_cache_usage_perc`` (0-1;
  ``vllm:gpu_cache_usage_perc`` before 0.9), ``vllm:num_requests_running``, ``vllm:num_requests_waiting``;
  the counter ``vllm:num_preemptions`` (exported with ``_total``); histograms
  ``vllm:request_prefill_time_seconds`` and ``vllm:request_decode_time_seconds`` (``_sum`` / ``_count``).
* llama-server (``--metrics``), ``tools/server/server-context.cpp`` (``examples/server/server.cpp`` in older
  trees), handle_metrics: gauges ``llamacpp:requests_processing``, ``llamacpp:requests_deferred``, counters
  ``llamacpp:prompt_tokens_total``, ``llamacpp:prompt_seconds_total``, ``llamacpp:tokens_predicted_total``,
  ``llamacpp:tokens_predicted_seconds_total``; ``llamacpp:kv_cache_usage_ratio`` only in builds before the
  unified KV cache (read when present).

A server without ``/metrics`` (llama-server without ``--metrics``, SGLang without its flag, a proxy) gives no
figures and one note, never an error. The text format is parsed by hand (``prometheus_client`` is not a
dependency): a sample line is ``name{labels} value [timestamp]``; samples of one name across label sets (vLLM's
engines) are summed, except usage ratios, which take the largest.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass

from qexplorer.core.domain.load import ServerMetrics
from qexplorer.core.server.client import ServerTarget, open_client

_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?\s+(\S+)')


def parse_prometheus(text: str) -> dict[str, list[float]]:
    """Every sample of the exposition text, by metric name (labels dropped; one value per label set)."""
    samples: dict[str, list[float]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        samples.setdefault(match.group(1), []).append(value)
    return samples


@dataclass(frozen=True)
class EngineMetricNames:
    """Which of an engine's metric names mean what; ``None``: the engine exports no such figure."""

    engine: str
    running: str  # its presence identifies the engine
    waiting: str
    kv_usage_ratio: tuple[str, ...] = ()  # 0-1, the first one present
    preemptions_total: str | None = None
    prefill_seconds: str | None = None  # a histogram's base name
    decode_seconds: str | None = None
    prompt_tokens_total: str | None = None  # counters of tokens and of the seconds spent on them
    prompt_seconds_total: str | None = None
    generated_tokens_total: str | None = None
    generation_seconds_total: str | None = None


ENGINES = (
    EngineMetricNames("vLLM", running="vllm:num_requests_running", waiting="vllm:num_requests_waiting",
                      kv_usage_ratio=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
                      preemptions_total="vllm:num_preemptions_total",
                      prefill_seconds="vllm:request_prefill_time_seconds",
                      decode_seconds="vllm:request_decode_time_seconds"),
    EngineMetricNames("llama-server", running="llamacpp:requests_processing", waiting="llamacpp:requests_deferred",
                      kv_usage_ratio=("llamacpp:kv_cache_usage_ratio",),
                      prompt_tokens_total="llamacpp:prompt_tokens_total",
                      prompt_seconds_total="llamacpp:prompt_seconds_total",
                      generated_tokens_total="llamacpp:tokens_predicted_total",
                      generation_seconds_total="llamacpp:tokens_predicted_seconds_total"),
)


def _total(samples: dict[str, list[float]], name: str | None) -> float | None:
    values = samples.get(name or "")
    return sum(values) if values else None


def _peak(samples: dict[str, list[float]], names: tuple[str, ...]) -> float | None:
    for name in names:
        values = [v for v in samples.get(name, []) if not math.isnan(v)]
        if values:
            return max(values)
    return None


def _delta(before: dict[str, list[float]], after: dict[str, list[float]], name: str | None) -> float | None:
    start, end = _total(before, name), _total(after, name)
    return end - start if start is not None and end is not None else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


class MetricsScraper:
    """Samples a server's ``/metrics`` in a thread while a level runs; :meth:`stop_level` reduces them."""

    def __init__(self, target: ServerTarget, interval_s: float = 0.5) -> None:
        self.target = target
        self.interval_s = interval_s
        self.url = target.base_url.rstrip("/").removesuffix("/v1") + "/metrics"
        self.names: EngineMetricNames | None = None
        self.note: str | None = None
        self._samples: list[dict[str, list[float]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None

    def probe(self) -> bool:
        """One scrape: which engine's names the server exports; False (and :attr:`note`) when none."""
        import httpx

        self._client = open_client(ServerTarget(self.target.base_url, self.target.api_key_env,
                                                timeout_s=min(5.0, self.target.timeout_s)))
        try:
            response = self._client.get(self.url)
        except httpx.HTTPError as exc:
            self.note = f"{self.url} did not answer ({type(exc).__name__}): the server's own view is not shown"
            return False
        if response.status_code != 200:
            hint = " (llama-server exports it only with --metrics)" if response.status_code in (404, 501) else ""
            self.note = f"{self.url} answered HTTP {response.status_code}{hint}: the server's own view is not shown"
            return False
        samples = parse_prometheus(response.text)
        self.names = next((names for names in ENGINES if names.running in samples), None)
        if self.names is None:
            self.note = (f"{self.url} exports neither vLLM's nor llama-server's metrics: the server's own view is "
                         "not shown")
            return False
        return True

    def _scrape(self) -> dict[str, list[float]] | None:
        import httpx

        try:
            response = self._client.get(self.url)
            return parse_prometheus(response.text) if response.status_code == 200 else None
        except httpx.HTTPError:
            return None  # a missed sample; the level goes on

    def start_level(self) -> None:
        if self.names is None:
            return
        self._samples = []
        self._stop.clear()
        first = self._scrape()
        if first is not None:
            self._samples.append(first)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            sample = self._scrape()
            if sample is not None:
                self._samples.append(sample)

    def stop_level(self) -> ServerMetrics | None:
        if self.names is None or self._thread is None:
            return None
        self._stop.set()
        self._thread.join(timeout=10)
        self._thread = None
        last = self._scrape()
        if last is not None:
            self._samples.append(last)
        samples, names = self._samples, self.names
        if len(samples) < 2:
            return None
        first, final = samples[0], samples[-1]
        kv = [p for p in (_peak(s, names.kv_usage_ratio) for s in samples) if p is not None]
        running = [r for r in (_total(s, names.running) for s in samples) if r is not None]
        waiting = [w for w in (_total(s, names.waiting) for s in samples) if w is not None]
        preemptions = _delta(first, final, names.preemptions_total)

        def per_request(base: str | None) -> float | None:
            if base is None:
                return None
            return _ratio(_delta(first, final, base + "_sum"), _delta(first, final, base + "_count"))

        return ServerMetrics(
            engine=names.engine, samples=len(samples), interval_s=self.interval_s,
            kv_cache_usage_peak_pct=100 * max(kv) if kv else None,
            running_max=round(max(running)) if running else None,
            waiting_max=round(max(waiting)) if waiting else None,
            preemptions=round(preemptions) if preemptions is not None else None,
            prefill_s_per_request=per_request(names.prefill_seconds),
            decode_s_per_request=per_request(names.decode_seconds),
            server_prompt_tok_s=_ratio(_delta(first, final, names.prompt_tokens_total),
                                       _delta(first, final, names.prompt_seconds_total)),
            server_decode_tok_s=_ratio(_delta(first, final, names.generated_tokens_total),
                                       _delta(first, final, names.generation_seconds_total)),
        )

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
        if self._client is not None:
            self._client.close()
            self._client = None
