"""Process-tree helpers shared by the job runner (parent side) and bench-server's watcher: one walk of a
process and its descendants, and one SIGKILL for a process group."""

from __future__ import annotations

import os
import signal


def tree_rss(pid: int) -> tuple[int, set[int]]:
    """RSS of a process and its descendants (a vLLM server the worker started), and their PIDs."""
    import psutil

    try:
        proc = psutil.Process(pid)
        total, pids = proc.memory_info().rss, {pid}
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
                pids.add(child.pid)
            except psutil.Error:
                continue
        return int(total), pids
    except psutil.Error:
        return 0, {pid}


def kill_group(pgid: int) -> None:
    """SIGKILL whatever is left of a process group (a worker is its leader: start_new_session)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
