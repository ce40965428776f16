"""What a job tells the outside while it runs: a small union of frozen events.

Core pipeline functions are generators of :data:`JobEvent` and *return* what
they make (``result = yield from step(...)``). The worker writes each event as
one JSON line with a ``type`` tag and, at the end, one :class:`Completed` line
carrying the record; the parent (:mod:`qexplorer.core.jobs.runner`) reads them
back with :func:`event_from_line`.

=============  ==========================================================
``phase``      a new phase begins (``dequantize``, ``quantize``, ``load``,
               ``benchmark``, ``reference``, ``quality``, ...); after a
               timed one (``benchmark``) the worker waits for a line on
               stdin: the parent's go, once nothing else runs
               (:mod:`qexplorer.core.jobs.overlap`)
``progress``   ``done`` of ``total`` units in the current phase
``log``        a line for the user (info or warning)
``metric``     one named measurement with its unit, as soon as it exists
``failed``     one sentence for a person; the job failed
``completed``  the finished record (wire only: ``run_job`` returns it)
=============  ==========================================================
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from qexplorer.core.jobs.record import ExportRecord, RunRecord
from qexplorer.core.serial import from_jsonable, to_jsonable

TIMED_PHASES = frozenset({"benchmark"})  # phases whose wall time is a figure: they run alone (jobs.overlap)


@dataclass(frozen=True)
class Phase:
    name: str
    message: str = ""

    @property
    def timed(self) -> bool:
        """A timed phase: the worker waits for the parent's go (one stdin line) before it starts the clock."""
        return self.name in TIMED_PHASES


@dataclass(frozen=True)
class Progress:
    phase: str
    done: float
    total: float
    message: str = ""


@dataclass(frozen=True)
class Log:
    message: str
    level: Literal["info", "warning"] = "info"

    @property
    def is_warning(self) -> bool:
        return self.level == "warning"


@dataclass(frozen=True)
class Metric:
    name: str  # e.g. "decode_tok_s", "kld_mean", "quantize_s"
    value: float
    unit: str  # "tok/s", "s", "", "%" ...
    sd: float | None = None


@dataclass(frozen=True)
class Failed:
    message: str


@dataclass(frozen=True)
class Completed:
    record: RunRecord | ExportRecord


JobEvent = Phase | Progress | Log | Metric | Failed
T = TypeVar("T")
WireEvent = JobEvent | Completed

_TAGS: dict[type, str] = {Phase: "phase", Progress: "progress", Log: "log", Metric: "metric", Failed: "failed",
                          Completed: "completed"}
_BY_TAG = {tag: cls for cls, tag in _TAGS.items()}


def event_to_line(event: WireEvent) -> str:
    if isinstance(event, Completed):
        kind = "export" if isinstance(event.record, ExportRecord) else "run"
        payload: dict[str, Any] = {"type": "completed", "kind": kind, "record": event.record.to_json()}
    else:
        payload = {"type": _TAGS[type(event)], **to_jsonable(event)}
    return json.dumps(payload, separators=(",", ":"), default=str)


def event_from_line(line: str) -> WireEvent:
    """Parse one line; raises ValueError for anything that is not an event (a stray library print)."""
    payload = json.loads(line)
    if not isinstance(payload, dict) or payload.get("type") not in _BY_TAG:
        raise ValueError("not an event")
    tag = payload.pop("type")
    if tag == "completed":
        data = payload.get("record")
        if not isinstance(data, dict):
            raise ValueError("a completed event without a record")
        record = ExportRecord.from_json(data) if payload.get("kind") == "export" else RunRecord.from_json(data)
        return Completed(record)
    return from_jsonable(_BY_TAG[tag], payload)


def drive(steps: Generator[JobEvent, None, T], on_event: Callable[[JobEvent], None] | None = None) -> T:
    """Run a step generator to its end, handing each event to ``on_event``; return what it returns."""
    while True:
        try:
            event = next(steps)
        except StopIteration as done:
            return done.value
        if on_event is not None:
            on_event(event)


class Cancelled(Exception):
    """Raised inside a pipeline when its cancel event is set."""


def checked(steps: Generator[JobEvent, None, T], cancel: threading.Event | None) -> Generator[JobEvent, None, T]:
    """Pass ``steps``' events through, raising :class:`Cancelled` after any event once ``cancel`` is set."""
    while True:
        try:
            event = next(steps)
        except StopIteration as done:
            return done.value
        yield event
        if cancel is not None and cancel.is_set():
            raise Cancelled()
