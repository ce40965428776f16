"""The worker process: ``python -m qexplorer.worker`` < job.json > events.jsonl

Thin on purpose: read a :class:`~qexplorer.core.pipeline.JobSpec` from stdin,
run :func:`~qexplorer.core.pipeline.run_job`, print one event per line. A crash
or an out-of-memory kill takes this process, never the app; its memory goes
back to the system when it exits. Library chatter goes to stderr, which the
parent keeps in the job's log file.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback

from qexplorer.core import events


def emit(event: events.Event) -> None:
    sys.stdout.write(event.to_line() + "\n")
    sys.stdout.flush()


def main() -> int:
    from qexplorer.core.errors import UserError
    from qexplorer.core.pipeline import JobSpec, run_job

    os.umask(0o077)  # everything the worker writes (checkpoints, GGUF files, caches) is the user's alone
    cancel = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: cancel.set())
    try:
        job = JobSpec.from_json(json.loads(sys.stdin.read()))
    except (ValueError, TypeError) as exc:
        emit(events.error(f"The worker received an invalid job description ({exc})."))
        return 2
    try:
        for event in run_job(job, cancel):
            emit(event)
    except events.Cancelled:
        emit(events.error("Cancelled."))
        return 3
    except UserError as exc:
        emit(events.error(str(exc)))
        return 2
    except MemoryError:
        emit(events.error("The worker ran out of memory."))
        return 4
    except Exception as exc:  # a bug or a library failure: one sentence up, the traceback to the log
        traceback.print_exc(file=sys.stderr)
        emit(events.error(f"{type(exc).__name__}: {exc}".splitlines()[0][:500]))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
