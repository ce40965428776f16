"""Benchmark backends: the one series loop (``loop``) and each engine's timed calls (``llamacpp_timer``,
``torch_timer``; vLLM's streamed requests are engines.vllm's), the noise probe and the bandwidth bound. The
benchmark's settings and statistics (:class:`~qexplorer.core.domain.bench.BenchConfig`, ``Stat``) are data
and live in :mod:`qexplorer.core.domain`."""
