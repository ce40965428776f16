"""A stand-in worker for the overlap tests: it speaks the worker's protocol (the job on stdin's first line, events
on stdout, a go line awaited after a timed phase) and, in every phase, burns CPU while it appends heartbeats
``<precision> <phase> <wall time>`` to ``<data_dir>/spy.log``. A heartbeat is proof that the process ran then."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from qexplorer.core.jobs.events import Completed, Phase, event_to_line
from qexplorer.core.jobs.record import ModelIdentity, RunRecord
from qexplorer.core.jobs.spec import JobSpec
from qexplorer.core.kinds import Family

PHASES = (("quantize", 0.8), ("benchmark", 0.6), ("quality", 0.8))


def emit(event: object) -> None:
    sys.stdout.write(event_to_line(event) + "\n")  # type: ignore[arg-type]
    sys.stdout.flush()


def main() -> None:
    job = JobSpec.from_json(json.loads(sys.stdin.readline()))
    spy = Path(job.data_dir) / "spy.log"
    for name, seconds in PHASES:
        phase = Phase(name)
        emit(phase)
        if phase.timed:
            sys.stdin.readline()
        end = time.monotonic() + seconds
        with open(spy, "a", encoding="utf-8") as handle:
            while time.monotonic() < end:
                handle.write(f"{job.precision} {name} {time.time():.6f}\n")
                handle.flush()
                sum(range(20_000))  # CPU work between heartbeats
    emit(Completed(RunRecord(model=ModelIdentity(name="spy", path="spy"), precision=job.precision,
                             precision_label=job.precision, family=Family.GGUF)))


if __name__ == "__main__":
    main()
