"""Benchmarking a server the user runs (vLLM, llama-server, SGLang) through its OpenAI-compatible API, as
llama-benchy does: ``client`` (the target and its streams), ``sweep`` (depths × concurrency, llama-benchy's
figures, the record), ``watch`` (the server's memory on this host), ``quality`` (echoed log-probs)."""

from qexplorer.core.server.client import ServerError, ServerTarget, discover_model
from qexplorer.core.server.quality import logprob_alignment, server_quality
from qexplorer.core.server.sweep import default_text, record_from_sweep, run_server_spec, sweep
from qexplorer.core.server.watch import ServerWatcher, server_pid

__all__ = ["ServerError", "ServerTarget", "ServerWatcher", "default_text", "discover_model", "logprob_alignment",
           "record_from_sweep", "run_server_spec", "server_pid", "server_quality", "sweep"]
