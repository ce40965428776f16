"""The parent's end of one worker process: its stdout read on a thread, its stdin for the go lines, its stop.

A worker runs in its own session (its process group is the job: the worker and any server it started), so a
stop reaches everything the job started.
"""

from __future__ import annotations

import queue
import subprocess
import threading

from qexplorer.core.proc import kill_group

TERMINATE_GRACE_S = 3.0
SERVER_STOP_S = 15.0  # a worker that runs vLLM stops it on SIGTERM before it exits


class WorkerChannel:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.stream_done = False
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"job-{proc.pid}-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    @property
    def finished(self) -> bool:
        return self.stream_done and self.proc.poll() is not None

    def next_line(self, timeout_s: float) -> str | None:
        """The next line the worker wrote, or None when none came within ``timeout_s`` (or the stream ended:
        then wait for the process's exit instead)."""
        if self.stream_done:
            try:
                self.proc.wait(timeout=max(0.01, timeout_s))
            except subprocess.TimeoutExpired:
                pass
            return None
        try:
            line = self._lines.get(timeout=max(0.01, timeout_s))
        except queue.Empty:
            return None
        if line is None:
            self.stream_done = True
        return line

    def send(self, line: str) -> None:
        send_line(self.proc, line)

    def stop(self, graceful: bool = True) -> None:
        """SIGTERM, a grace, then SIGKILL to the whole process group. A worker given SIGTERM stops its server
        itself first; a paused one must not be asked gracefully (it cannot act on the signal)."""
        proc = self.proc
        if graceful and proc.poll() is None:
            try:
                proc.terminate()
                proc.wait(timeout=TERMINATE_GRACE_S + SERVER_STOP_S)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        kill_group(proc.pid)
        if proc.poll() is None:
            proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.stop()
        kill_group(self.proc.pid)  # whatever a crashed worker left behind (a vLLM server) goes too
        self._reader.join(timeout=2)
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass


def send_line(proc: subprocess.Popen[str], line: str) -> None:
    """One line to a worker's stdin: the job, then a go after each phase it runs alone."""
    if proc.stdin is None:
        return
    try:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
    except (BrokenPipeError, OSError):
        pass  # it exited (at once, or meanwhile); its exit code says why
