"""The host's side of telemetry: :class:`HostProbe` (what the sampler asks of a host) and
:class:`LocalHostProbe` for this machine - psutil, plus the /proc files Linux has (``meminfo``, ``pressure/memory``,
a process's ``status``) read by one bounded key-value reader."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PressureStall:
    """``/proc/pressure/memory``: % of wall time tasks were stalled on memory."""

    some_avg10: float
    full_avg10: float


class HostProbe(Protocol):
    """Host memory and processes; real (psutil + /proc) or simulated."""

    def meminfo(self) -> dict[str, int]:
        """Bytes for MemTotal, MemAvailable, MemFree, Cached, SReclaimable, Shmem,
        Mlocked, SwapTotal, SwapFree, Hugetlb - whichever the platform has."""
        ...

    def pressure(self) -> PressureStall | None: ...
    def process(self, pid: int) -> tuple[str, int] | None: ...  # name, rss bytes
    def top_processes(self, count: int) -> list[tuple[int, str, int]]: ...  # pid, name, rss
    def in_container(self) -> bool: ...  # NVML then reports host PIDs that this namespace cannot see


_MEMINFO_KEYS = ("Cached", "SReclaimable", "Hugetlb", "MemFree", "Shmem", "Mlocked")


class LocalHostProbe:
    """:class:`HostProbe` for this machine: psutil, plus /proc where Linux has it."""

    def __init__(self, proc_root: str = "/proc") -> None:
        self._proc_root = proc_root
        self._last_top: list[tuple[int, str, int]] = []
        self._last_top_at = 0.0
        self._in_container: bool | None = None

    def meminfo(self) -> dict[str, int]:
        import psutil

        vm = psutil.virtual_memory()
        swap = psutil.swap_memory()
        values = {
            "MemTotal": int(vm.total),
            "MemAvailable": int(vm.available),
            "SwapTotal": int(swap.total),
            "SwapFree": int(swap.free),
        }
        values.update(read_meminfo(os.path.join(self._proc_root, "meminfo"), _MEMINFO_KEYS))
        return values

    def pressure(self) -> PressureStall | None:
        return read_pressure(os.path.join(self._proc_root, "pressure", "memory"))

    def process(self, pid: int) -> tuple[str, int] | None:
        import psutil

        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                return proc.name(), int(proc.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None

    def in_container(self) -> bool:
        """A container (docker, podman) or a nested PID namespace: NVML's PIDs are not ours (FACTS §9).
        It does not change while the process runs: looked up once, not at every sample."""
        if self._in_container is None:
            marked = bool(os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")
                          or os.environ.get("container"))
            status = read_proc_fields(os.path.join(self._proc_root, "self", "status"), ("NSpid",))
            self._in_container = marked or len(status.get("NSpid", "").split()) > 1
        return self._in_container

    def top_processes(self, count: int) -> list[tuple[int, str, int]]:
        # Walking every process costs a few ms; the table does not need it at
        # the sampling rate, so it is refreshed at most every 5 s.
        now = time.monotonic()
        if self._last_top and now - self._last_top_at < 5.0:
            return self._last_top
        import psutil

        rows = []
        for proc in psutil.process_iter(["pid", "name", "memory_info"]):
            info = proc.info
            mem = info.get("memory_info")
            if mem is not None:
                rows.append((int(info["pid"]), str(info.get("name") or "?"), int(mem.rss)))
        rows.sort(key=lambda row: row[2], reverse=True)
        self._last_top = rows[:count]
        self._last_top_at = now
        return self._last_top


def read_proc_fields(path: str, keys: Iterable[str]) -> dict[str, str]:
    """The text after ``key:`` for each named field of a ``/proc`` key-value file (absent file or key: absent)."""
    wanted = set(keys)
    found: dict[str, str] = {}
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in wanted:
                    found[key] = rest.strip()
    except OSError:
        return {}
    return found


def read_meminfo(path: str, keys: Iterable[str]) -> dict[str, int]:
    """The named ``/proc/meminfo`` (or ``/proc/self/status``) fields in bytes (absent file or key: absent)."""
    found: dict[str, int] = {}
    try:
        for key, text in read_proc_fields(path, keys).items():
            parts = text.split()
            if parts:
                scale = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
                found[key] = int(parts[0]) * scale
    except ValueError:
        return {}
    return found


def read_pressure(path: str) -> PressureStall | None:
    """Parse ``/proc/pressure/memory``; None where the kernel has no PSI."""
    try:
        with open(path, encoding="ascii") as handle:
            text = handle.read()
    except OSError:
        return None
    return parse_pressure(text)


def parse_pressure(text: str) -> PressureStall | None:
    values: dict[str, float] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        for field_text in rest.split():
            name, _, number = field_text.partition("=")
            if name == "avg10":
                try:
                    values[kind] = float(number)
                except ValueError:
                    return None
    if "some" not in values:
        return None
    return PressureStall(some_avg10=values["some"], full_avg10=values.get("full", 0.0))
