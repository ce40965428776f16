"""Benchmarking a server the user runs (vLLM, llama-server, SGLang) through its OpenAI-compatible API, as
llama-benchy does: ``client`` (the target and its streams), ``sweep`` (depths × concurrency, llama-benchy's
figures, the record), ``load`` (a load sweep's percentiles, service objective, goodput and early stop, after
GuideLLM), ``metrics`` (the server's own Prometheus /metrics), ``watch`` (the server's memory on this host),
``quality`` (echoed log-probs)."""

from qexplorer.core.server.client import ServerError, ServerTarget, discover_model
from qexplorer.core.server.load import goodput, meets, misses, stop_reason
from qexplorer.core.server.metrics import MetricsScraper, parse_prometheus
from qexplorer.core.server.quality import logprob_alignment, server_quality
from qexplorer.core.server.sweep import default_text, record_from_sweep, run_server_spec, sweep
from qexplorer.core.server.watch import ServerWatcher, server_pid

__all__ = ["MetricsScraper", "ServerError", "ServerTarget", "ServerWatcher", "default_text", "discover_model",
           "goodput", "logprob_alignment", "meets", "misses", "parse_prometheus", "record_from_sweep",
           "run_server_spec", "server_pid", "server_quality", "stop_reason", "sweep"]
