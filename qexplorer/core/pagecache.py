"""Dropping the page cache before a load on unified memory (GB10).

On GB10 the GPU allocates from the same free pages as the host. Streaming a checkpoint fills them with page
cache; MemAvailable still counts that cache as available, but the driver fails with NV_ERR_NO_MEMORY once the
free pages run out, and the host can freeze (github.com/vllm-project/vllm/issues/56824,
github.com/NVIDIA/open-gpu-kernel-modules/issues/1358). Dropping the cache before the load is what worked in the
field (github.com/tonyd2wild/GLM-5.3-Flash-NVFP4-DFlash2-2x-DGX-Spark/pull/19; users of
github.com/MiaAI-Lab/GLM-5.3-Flash-EXL3-2x-DGX-Sparks/issues/47 drop caches before every launch).

``sync`` first (dirty pages cannot be dropped), then ``1`` to ``/proc/sys/vm/drop_caches``: the page cache only,
not dentries and inodes. Writing there needs root; a container mounts ``/proc/sys`` read-only. Either way the
load goes ahead, and :class:`CacheDrop` says in one sentence what happened. The memory guard's MemFree rule
(:mod:`qexplorer.core.jobs.guard`) still watches the load.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DROP_CACHES_PATH = Path("/proc/sys/vm/drop_caches")
DROP_PAGE_CACHE = "1"  # 1: page cache; 2: dentries and inodes; 3: both (Documentation/admin-guide/sysctl/vm.rst)


@dataclass(frozen=True)
class CacheDrop:
    dropped: bool
    message: str  # one sentence: what was done, or why not


def _effective_uid() -> int | None:
    geteuid = getattr(os, "geteuid", None)  # absent on Windows
    return geteuid() if geteuid is not None else None


def drop_page_cache(path: Path = DROP_CACHES_PATH, *, euid: int | None = None,
                    sync: Callable[[], None] = os.sync) -> CacheDrop:
    """Sync, then drop the page cache by writing to ``path`` - as root only; otherwise say why not.
    ``path``, ``euid`` and ``sync`` are seams for tests (never write the real file from a test)."""
    uid = _effective_uid() if euid is None else euid
    if uid != 0:
        who = f"uid {uid}" if uid is not None else "a user without root"
        return CacheDrop(False, f"The page cache was not dropped before loading: writing {path} needs root and "
                                f"qexplorer runs as {who} (run `sync; echo 1 | sudo tee {path}` first to do it "
                                "by hand).")
    sync()
    try:
        with open(path, "w", encoding="ascii") as handle:
            handle.write(DROP_PAGE_CACHE)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return CacheDrop(False, f"The page cache was not dropped before loading: writing {path} failed "
                                f"({reason}; a container mounts /proc/sys read-only).")
    return CacheDrop(True, f"Dropped the page cache before loading (sync, then {DROP_PAGE_CACHE} > {path}), so "
                           "that the checkpoint's page cache does not take the free pages the GPU needs on "
                           "unified memory.")
