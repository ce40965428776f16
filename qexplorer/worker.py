"""The worker process: ``python -m qexplorer.worker`` < job.json > events.jsonl

Thin on purpose: read a :class:`~qexplorer.core.domain.spec.JobSpec` from the
first line of stdin, run :func:`~qexplorer.core.pipeline.run_job`, print one
event per line and, at the end, one ``completed`` line with the record. After a
timed phase's event it reads one more line (the parent's go: nothing else runs
now) before the clock starts; a closed stdin means go. A crash or an out-of-memory
kill takes this process, never the app; its memory goes back to the system
when it exits. Library chatter goes to stderr, which the parent keeps in the
job's log file.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback

from qexplorer.core.domain.bench import THREAD_ENV_KEY, THREAD_VARS
from qexplorer.core.domain.events import (
    Cancelled,
    Completed,
    Failed,
    Phase,
    ReuseQuery,
    WireEvent,
    event_to_line,
    reuse_answer_from_line,
)
from qexplorer.core.domain.record import RunRecord


def emit(event: WireEvent) -> None:
    sys.stdout.write(event_to_line(event) + "\n")
    sys.stdout.flush()


def set_threads(count: int) -> None:
    """The intra-op threads of this worker's libraries (PyTorch, OpenMP, BLAS), now and for what it imports
    later. Engines given a thread count of their own (llama.cpp's n_threads, vLLM's OMP_NUM_THREADS) keep it; the
    user's own values are kept for the server a job starts (engines.vllm.serving_env)."""
    os.environ.setdefault(THREAD_ENV_KEY, json.dumps({name: os.environ.get(name) for name in THREAD_VARS}))
    for name in THREAD_VARS:
        os.environ[name] = str(count)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(count)


def ask_reuse(query: ReuseQuery) -> RunRecord | None:
    """Ask the parent for an earlier measurement (it alone opens the results store) and read its answer."""
    emit(query)
    return reuse_answer_from_line(sys.stdin.readline())


def main() -> int:
    from qexplorer.core.domain.spec import JobSpec
    from qexplorer.core.errors import UserError
    from qexplorer.core.pipeline import run_job

    os.umask(0o077)  # everything the worker writes (checkpoints, GGUF files, caches) is the user's alone
    cancel = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: cancel.set())
    try:
        job = JobSpec.from_json(json.loads(sys.stdin.readline()))
    except (ValueError, TypeError) as exc:
        emit(Failed(f"The worker received an invalid job description ({exc})."))
        return 2
    if job.prepare_threads:
        set_threads(job.prepare_threads)
    steps = run_job(job, cancel, ask_reuse)
    try:
        while True:
            try:
                event = next(steps)
                emit(event)
                if isinstance(event, Phase) and event.alone:
                    sys.stdin.readline()  # wait for the go: the parent has paused every other job
                    if job.prepare_threads:  # measuring from here on: the benchmark's threads
                        set_threads(job.bench.thread_count)
            except StopIteration as done:
                emit(Completed(done.value))
                return 0
    except Cancelled:
        emit(Failed("Cancelled."))
        return 3
    except UserError as exc:
        emit(Failed(str(exc)))
        return 2
    except MemoryError:
        emit(Failed("The worker ran out of memory."))
        return 4
    except Exception as exc:  # a bug or a library failure: one sentence up, the traceback to the log
        traceback.print_exc(file=sys.stderr)
        emit(Failed(f"{type(exc).__name__}: {exc}".splitlines()[0][:500]))
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
