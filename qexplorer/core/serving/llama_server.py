"""llama.cpp's own ``llama-server``: how a GGUF artifact is served for a load sweep, and the one child that serves it.

llama-cpp-python's server interrupts a running request when another arrives, so a GGUF load sweep needs
llama.cpp's server, which batches the requests of its ``--parallel`` slots. Set-up builds it from the same
vendored llama.cpp as the llama-cpp-python wheel, with the same flags (``scripts/llama_server.sh``), and
installs it as ``$(sys.prefix)/bin/llama-server``.

The command, each flag checked in that llama.cpp (llama-cpp-python 0.3.36, ``vendor/llama.cpp``):

* ``-np N`` (``--parallel``, ``common/arg.cpp``: "number of server slots") and ``-c`` (``--ctx-size``) =
  N × ``ctx_per_slot``: with an explicit ``-np`` the KV cache is not unified (``kv_unified`` is set only for
  ``-np -1``, ``tools/server/server.cpp``), so ``src/llama-context.cpp`` gives each slot
  ``n_ctx_seq = n_ctx / n_seq_max``, padded to 256 - a ``ctx_per_slot`` that is a multiple of 256 is exact.
* ``-t`` (``--threads``), ``-ngl`` (``--n-gpu-layers``: a number, ``auto`` or ``all``; a CPU build ignores it
  with a warning), ``-fa`` (``--flash-attn on|off|auto``).
* ``--metrics``: the Prometheus ``/metrics`` (``llamacpp:`` names) that ``core.server.metrics`` samples; off by
  default in llama.cpp. ``--no-webui`` (``--no-ui``): no web page on a measuring server.
* Continuous batching is llama.cpp's default (``common/common.h``: ``cont_batching = true``), so no flag.
* ``-ngl`` and ``-c`` are given, so llama.cpp's ``--fit`` (on by default, it adjusts *unset* parameters to the
  device's free memory) changes neither.

``GET /health`` answers 503 while the model loads and 200 once it is ready (``tools/server/server.cpp``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from qexplorer.core.domain.events import Cancelled
from qexplorer.core.errors import UserError
from qexplorer.core.serving.vllm_launch import shell_command

LLAMA_SERVER_ENV = "QEXPLORER_LLAMA_SERVER"
NOT_INSTALLED = ("llama-server is not installed here (scripts/setup.sh builds it from the llama.cpp llama-cpp-python "
                 "vendors; or set QEXPLORER_LLAMA_SERVER)")
START_TIMEOUT_S = 300.0  # loading a large GGUF from a cold disk; the bundled model is ready in about a second
STOP_GRACE_S = 10.0
POLL_S = 0.2
LOG_TAIL_LINES = 8


def find_llama_server(environ: dict[str, str] | None = None) -> Path | None:
    """The llama-server to run, first found wins: ``QEXPLORER_LLAMA_SERVER``, the environment's own
    ``bin/llama-server`` (where set-up installs it), ``llama-server`` on the PATH."""
    env = os.environ if environ is None else environ
    named = env.get(LLAMA_SERVER_ENV)
    candidates = [Path(named)] if named else []
    candidates.append(Path(sys.prefix) / "bin" / "llama-server")
    on_path = shutil.which("llama-server", path=env.get("PATH"))
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_llama_server(environ: dict[str, str] | None = None) -> Path:
    """:func:`find_llama_server`, or one sentence that says why there is none."""
    env = os.environ if environ is None else environ
    named = env.get(LLAMA_SERVER_ENV)
    found = find_llama_server(env)
    if named and found != Path(named):
        raise UserError(f"{LLAMA_SERVER_ENV}={named} is not an executable file; point it at a llama-server binary "
                        "or unset it.")
    if found is None:
        raise UserError(NOT_INSTALLED)
    return found


@dataclass(frozen=True)
class LlamaServerSettings:
    """How llama-server serves one GGUF: its slots, each slot's context, threads, offload."""

    model_path: Path
    parallel: int = 1  # slots: requests decoded together
    ctx_per_slot: int = 4096  # tokens of context each slot holds (prompt + generation)
    threads: int | None = None  # None: llama.cpp's own choice
    n_gpu_layers: int | Literal["auto", "all"] = "all"
    flash_attn: Literal["auto", "on"] = "auto"
    metrics: bool = True
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.parallel < 1:
            raise UserError(f"llama-server needs at least one slot (--parallel), not {self.parallel}.")
        if self.ctx_per_slot < 1:
            raise UserError(f"Each llama-server slot needs a positive context, not {self.ctx_per_slot} tokens.")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"llama-server needs at least one thread, not {self.threads}.")

    @property
    def ctx_total(self) -> int:
        """``-c``: llama.cpp splits it evenly across the ``-np`` slots."""
        return self.parallel * self.ctx_per_slot

    def flags(self) -> tuple[str, ...]:
        """Everything after the model, host and port."""
        flags = ["-np", str(self.parallel), "-c", str(self.ctx_total)]
        if self.threads is not None:
            flags += ["-t", str(self.threads)]
        flags += ["-ngl", str(self.n_gpu_layers), "-fa", self.flash_attn]
        if self.metrics:
            flags.append("--metrics")
        return (*flags, "--no-webui", *self.extra_args)

    def argv(self, binary: Path | str, host: str, port: int) -> tuple[str, ...]:
        """The exact command that starts the server."""
        return (str(binary), "-m", str(self.model_path), "--host", host, "--port", str(port), *self.flags())

    @property
    def serve_command(self) -> str:
        """How a user serves this artifact the way it was measured (host and port are the user's to choose)."""
        return shell_command(["llama-server", "-m", str(self.model_path), *self.flags()])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LlamaServer:
    """One llama-server child on a loopback port; a context manager that always stops it.

    The child stays in the caller's process group (as vLLM's does), so a job ended by its group ends its
    server too.
    """

    def __init__(self, settings: LlamaServerSettings, log_dir: Path, *, binary: Path | None = None,
                 host: str = "127.0.0.1") -> None:
        self.settings = settings
        self.binary = binary if binary is not None else require_llama_server()
        self.host = host
        self.log_path = log_dir / "llama-server.log"
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's base URL (``http://127.0.0.1:PORT``): ``ServerTarget`` adds ``/v1``, ``/metrics`` sits here."""
        if self.port is None:
            raise RuntimeError("llama-server has not been started")
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, cancel: threading.Event | None = None, timeout_s: float = START_TIMEOUT_S) -> str:
        """Launch the server and wait until ``/health`` answers 200; return :attr:`url`. Raises :class:`UserError`
        (with the end of its log) when it exits or does not become ready in time, :class:`Cancelled` when
        ``cancel`` is set first; the process is stopped in every case."""
        import httpx

        if not self.settings.model_path.is_file():
            raise UserError(f"{self.settings.model_path} is not a GGUF file llama-server can load.")
        self.port = free_port(self.host)
        argv = self.settings.argv(self.binary, self.host, self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:  # the child holds its own descriptor
            try:
                self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            except OSError as exc:
                raise UserError(f"{self.binary} could not be run ({exc.strerror}); rebuild it with scripts/setup.sh "
                                f"or point {LLAMA_SERVER_ENV} at another llama-server.") from None
        deadline = time.monotonic() + timeout_s
        try:
            with httpx.Client(timeout=2.0, trust_env=False) as client:
                while True:
                    code = self.proc.poll()
                    if code is not None:
                        raise UserError(f"llama-server stopped while loading {self.settings.model_path.name} "
                                        f"(exit code {code}); the end of its log ({self.log_path}):\n"
                                        f"{self.log_tail()}")
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("llama-server's start was cancelled")
                    if time.monotonic() > deadline:
                        raise UserError(f"llama-server did not become ready within {timeout_s:g} s; the end of its "
                                        f"log ({self.log_path}):\n{self.log_tail()}")
                    try:
                        if client.get(f"{self.url}/health").status_code == 200:
                            return self.url
                    except httpx.HTTPError:
                        pass  # not listening yet
                    if cancel is not None:
                        cancel.wait(POLL_S)
                    else:
                        time.sleep(POLL_S)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM, a grace for llama-server to finish its requests, then SIGKILL; always reaps the child."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        kept = [line.rstrip() for line in self.log_text().splitlines() if line.strip()][-lines:]
        return "\n".join(f"  {line}" for line in kept) if kept else "  (it wrote nothing)"

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
