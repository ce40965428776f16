"""What a job tells the outside while it runs: a small union of frozen events.

Core pipeline functions are generators of :data:`JobEvent` and *return* what
they make (``result = yield from step(...)``). The worker writes each event as
one JSON line with a ``type`` tag and, at the end, one :class:`Completed` line
carrying the record; the parent (:mod:`qexplorer.core.jobs.runner`) reads them
back with :func:`event_from_line`.

=============  ==========================================================
``phase``      a new phase begins (a :class:`~qexplorer.core.domain.phases.PhaseKind`); after one
               that runs alone (the benchmark, the bandwidth test) the
               worker waits for a line on stdin: the parent's go, once
               nothing else runs (:mod:`qexplorer.core.jobs.overlap`)
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

from qexplorer.core.domain.phases import PHASES, PhaseKind
from qexplorer.core.domain.record import ExportRecord, RunRecord
from qexplorer.core.serial import from_jsonable, to_jsonable


@dataclass(frozen=True)
class Phase:
    name: PhaseKind
    message: str = ""

    @property
    def alone(self) -> bool:
        """A phase that runs alone (:mod:`qexplorer.core.domain.phases`): the worker waits for the parent's go (one stdin line)
        before it starts the clock."""
        return PHASES[self.name].alone


@dataclass(frozen=True)
class Progress:
    phase: PhaseKind
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


@dataclass(frozen=True)
class ReuseQuery:
    """The worker asks whether this artifact was measured already with the same key (:mod:`qexplorer.core.reuse`).
    Only the parent opens the results store: it answers with one line on the worker's stdin, the earlier record
    or nothing (:func:`reuse_answer_line`)."""

    model_path: str
    precision: str
    key: str


JobEvent = Phase | Progress | Log | Metric | Failed
T = TypeVar("T")
WireEvent = JobEvent | Completed | ReuseQuery

_TAGS: dict[type, str] = {Phase: "phase", Progress: "progress", Log: "log", Metric: "metric", Failed: "failed",
                          Completed: "completed", ReuseQuery: "reuse-query"}
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


def reuse_answer_line(record: RunRecord | None) -> str:
    return json.dumps({"record": record.to_json() if record is not None else None}, default=str)


def reuse_answer_from_line(line: str) -> RunRecord | None:
    """The parent's answer; an empty or unreadable line (stdin closed, a parent without a store) is no."""
    try:
        data = json.loads(line or "{}").get("record")
        return RunRecord.from_json(data) if isinstance(data, dict) else None
    except (ValueError, TypeError, AttributeError, KeyError):
        return None


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
