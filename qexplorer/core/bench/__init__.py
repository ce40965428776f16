"""Benchmark backends: the one series loop (``loop``) and each engine's timed calls (``llamacpp``,
``torch_backend``), the running-server sweep (``server``), the noise probe and the bandwidth bound. The
benchmark's settings and statistics (:class:`~qexplorer.core.domain.bench.BenchConfig`, ``Stat``) are data
and live in :mod:`qexplorer.core.domain`."""
