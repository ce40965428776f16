"""The server's own memory when it runs on this host: the process listening on the target's port, and its
process tree's peak RSS sampled in a thread while the sweep runs."""

from __future__ import annotations

import threading
from urllib.parse import urlparse

from qexplorer.core.bench.noise import own_tree
from qexplorer.core.domain.record import ServerProcess
from qexplorer.core.server.client import ServerTarget


class ServerWatcher:
    """The server's process tree, when it listens on this host: its PID from the port, its peak RSS sampled in a
    thread while the sweep runs."""

    def __init__(self, pid: int | None, note: str | None, interval_s: float = 0.25) -> None:
        self.pid = pid
        self.note = note
        self.name = ""
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None
        if pid is not None:
            import psutil

            try:
                self.name = psutil.Process(pid).name()
            except psutil.Error:
                self.name = "?"
            self._thread = threading.Thread(target=self._watch, args=(interval_s,), daemon=True)
            self._thread.start()

    @staticmethod
    def for_target(target: ServerTarget) -> ServerWatcher:
        pid, note = server_pid(target)
        return ServerWatcher(pid, note)

    def tree(self) -> set[int]:
        return own_tree(self.pid) if self.pid is not None else set()

    def _watch(self, interval_s: float) -> None:
        from qexplorer.core.proc import tree_rss

        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid)[0])
            self._stop.wait(interval_s)

    def stop(self) -> ServerProcess | None:
        if self._thread is None or self.pid is None:
            return None
        self._stop.set()
        self._thread.join(timeout=2)
        return ServerProcess(pid=self.pid, name=self.name, peak_rss_bytes=self.peak or None,
                             note="RSS of the server's process tree, sampled every 0.25 s during the sweep")


def server_pid(target: ServerTarget) -> tuple[int | None, str | None]:
    """The PID listening on the target's port when the host is this machine; else None and why."""
    import ipaddress
    import socket

    import psutil

    parsed = urlparse(target.base_url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except OSError:
        return None, f"{host} does not resolve here, so the server's memory is not measured"
    local = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    if not any(ipaddress.ip_address(a.split("%")[0]).is_loopback or a in local for a in addresses):
        return None, f"{host} is another machine: its memory is not measured"
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid, None
    except psutil.AccessDenied:
        return None, "no permission to see which process listens on the port (run as its user to measure it)"
    return None, f"no process of this user listens on port {port}, so the server's memory is not measured"
