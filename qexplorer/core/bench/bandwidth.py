"""Memory bandwidth for the decode roofline (FACTS §3).

GPUs (discrete or unified - GB10 273 GB/s): published peak figures by device
name. CPU: measured here with a STREAM-style copy (bytes read + written per
second) on as many threads as the benchmark decodes with - one thread cannot
saturate a memory controller, so a single-threaded copy understates the bound
and pushes the roofline above 100 % - labelled as measured.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

PUBLISHED_BYTES_S = (
    ("GB10", 273e9),
    ("Thor", 273e9),
    ("Orin", 204.8e9),
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12),
    ("L40S", 864e9),
    ("RTX 4090", 1.008e12),
)


ROOFLINE_LIMIT_PCT = 100.0


def roofline_note(pct: float | None, bandwidth_source: str | None) -> str | None:
    """A roofline above 100 % is a sign that the bound is wrong (cache-resident weights, a bandwidth figure
    that is too low), not a fact: the sentence that says so, shown in its place."""
    if pct is None or pct <= ROOFLINE_LIMIT_PCT:
        return None
    return (f"{pct:.0f} % is above the memory-bandwidth bound ({bandwidth_source or 'unknown source'}): the "
            f"weights may sit in cache or the bandwidth figure is too low - not a measured fact")


def published_bandwidth(device_name: str) -> float | None:
    for needle, value in PUBLISHED_BYTES_S:
        if needle.lower() in device_name.lower():
            return value
    return None


def measure_host_bandwidth(threads: int = 1, size_bytes: int = 512 * 1024 * 1024, repeats: int = 5) -> float:
    """Best of ``repeats`` copies of a ``size_bytes`` buffer split across ``threads`` threads: (read + write) / s.

    numpy releases the GIL while it copies, so the slices run in parallel like OpenMP's STREAM threads."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    threads = max(1, threads)
    source = np.ones(size_bytes // 8, dtype=np.float64)
    target = np.empty_like(source)
    edges = np.linspace(0, source.size, threads + 1, dtype=np.int64)
    slices = [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    best = float("inf")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(lambda part: np.copyto(target[part], source[part]), slices))
            best = min(best, time.perf_counter() - start)
    return 2 * size_bytes / best


def host_bandwidth(cache: Path, cpu: str, threads: int = 1) -> tuple[float, str]:
    """The host's copy bandwidth on ``threads`` threads, measured once per CPU and thread count and cached -
    only when the noise probe says the machine was quiet while it ran: a copy test beside other work measures
    less than the bound and would inflate every later roofline. A noisy value is used once, labelled, and
    measured again next time."""
    from qexplorer.core.bench.noise import NoiseProbe

    key = f"{cpu} × {threads} threads"
    try:
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if isinstance(cached, dict) and cached.get(key, 0) > 0:
            return float(cached[key]), f"measured (STREAM copy, {threads} threads, cached)"
    except (OSError, ValueError, AttributeError):
        cached = {}
    probe = NoiseProbe().start()
    value = measure_host_bandwidth(threads)
    noise = probe.stop(None)
    if noise.noisy:
        return value, f"measured (STREAM copy, {threads} threads; not cached: {noise.reason})"
    try:
        known = cached if isinstance(cached, dict) else {}
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps({**{k: v for k, v in known.items() if isinstance(v, float)}, key: value}),
                       encoding="utf-8")
        os.replace(tmp, cache)
    except OSError:
        pass
    return value, f"measured (STREAM copy, {threads} threads)"
