"""Memory bandwidth for the decode roofline (FACTS §3).

GPUs: published peak figures by device name. CPU: measured here with a
STREAM-style copy (bytes read + written per second), labelled as measured.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

PUBLISHED_BYTES_S = (
    ("GB10", 273e9),
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12),
    ("L40S", 864e9),
    ("RTX 4090", 1.008e12),
)


def published_bandwidth(device_name: str) -> float | None:
    for needle, value in PUBLISHED_BYTES_S:
        if needle.lower() in device_name.lower():
            return value
    return None


def measure_host_bandwidth(size_bytes: int = 256 * 1024 * 1024, repeats: int = 5) -> float:
    """Best of ``repeats`` copies of a ``size_bytes`` buffer: (read + write) / s."""
    import numpy as np

    source = np.ones(size_bytes // 8, dtype=np.float64)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * size_bytes / best


def host_bandwidth(cache: Path, cpu: str) -> tuple[float, str]:
    """The host's copy bandwidth, measured once per CPU and cached."""
    try:
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached.get("cpu") == cpu and cached.get("bytes_s", 0) > 0:
            return float(cached["bytes_s"]), "measured (STREAM copy, cached)"
    except (OSError, ValueError, AttributeError):
        pass
    value = measure_host_bandwidth()
    try:
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"cpu": cpu, "bytes_s": value}), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError:
        pass
    return value, "measured (STREAM copy)"
