"""A stand-in worker for the overlap tests: it speaks the worker's protocol (the job on stdin's first line, events
on stdout, a go line awaited before a phase that runs alone) and, in every phase, burns CPU while it appends
heartbeats ``<precision> <phase> <wall time>`` to ``<data_dir>/spy.log`` and reports progress every 0.1 s. A
heartbeat is proof that the process ran then. The job's ``engine_args`` may name the phases as ``phase:seconds``
(default: quantize 0.8 s, benchmark 0.6 s, quality 0.8 s, calibrate 0.2 s - the real worker's order)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from qexplorer.core.domain.events import Completed, Phase, Progress, event_to_line
from qexplorer.core.domain.phases import PhaseKind
from qexplorer.core.domain.record import ModelIdentity, RunRecord
from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.kinds import Family

PHASES = ((PhaseKind.QUANTIZE, 0.8), (PhaseKind.BENCHMARK, 0.6), (PhaseKind.QUALITY, 0.8),
          (PhaseKind.CALIBRATE, 0.2))


def emit(event: object) -> None:
    sys.stdout.write(event_to_line(event) + "\n")  # type: ignore[arg-type]
    sys.stdout.flush()


def main() -> None:
    job = JobSpec.from_json(json.loads(sys.stdin.readline()))
    spy = Path(job.data_dir) / "spy.log"
    phases = [(PhaseKind(a.split(":")[0]), float(a.split(":")[1])) for a in job.engine_args] or PHASES
    for name, seconds in phases:
        phase = Phase(name)
        emit(phase)
        if phase.alone:
            sys.stdin.readline()
        started = time.monotonic()
        end, next_progress = started + seconds, started
        with open(spy, "a", encoding="utf-8") as handle:
            while (now := time.monotonic()) < end:
                handle.write(f"{job.precision} {name} {time.time():.6f}\n")
                handle.flush()
                sum(range(20_000))  # CPU work between heartbeats
                if now >= next_progress:
                    emit(Progress(name, now - started, seconds))
                    next_progress = now + 0.1
    emit(Completed(RunRecord(model=ModelIdentity(name="spy", path="spy"), precision=job.precision,
                             precision_label=job.precision, family=Family.GGUF)))


if __name__ == "__main__":
    main()
