"""Job events: what a worker process tells its parent, one JSON object per line.

Core pipeline functions are generators of these; the worker prints them; the
parent (:mod:`qexplorer.core.jobs`) parses them back. Types:

* ``phase``    - a new phase begins (``load``, ``quantize``, ``benchmark``, ...)
* ``progress`` - ``done`` of ``total`` units in the current phase
* ``log``      - a line for the user (``level`` info / warning)
* ``metric``   - one named measurement with its unit
* ``result``   - the finished result record (a dict)
* ``error``    - one sentence for a person; the job failed
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    type: str
    phase: str = ""
    message: str = ""
    done: float = 0.0
    total: float = 0.0
    name: str = ""
    value: float | None = None
    unit: str = ""
    level: str = "info"
    data: dict[str, Any] = field(default_factory=dict)

    def to_line(self) -> str:
        payload = {k: v for k, v in asdict(self).items() if v not in ("", None, 0.0, {}) or k == "type"}
        return json.dumps(payload, separators=(",", ":"))

    @staticmethod
    def from_line(line: str) -> Event:
        payload = json.loads(line)
        if not isinstance(payload, dict) or "type" not in payload:
            raise ValueError("not an event")
        known = {k: payload[k] for k in Event.__dataclass_fields__ if k in payload}
        return Event(**known)


def phase(name: str, message: str = "") -> Event:
    return Event("phase", phase=name, message=message or name)


def progress(phase_name: str, done: float, total: float, message: str = "") -> Event:
    return Event("progress", phase=phase_name, done=done, total=total, message=message)


def log(message: str, level: str = "info") -> Event:
    return Event("log", message=message, level=level)


def metric(name: str, value: float, unit: str) -> Event:
    return Event("metric", name=name, value=value, unit=unit)


def result(record: dict[str, Any]) -> Event:
    return Event("result", data=record)


def error(message: str) -> Event:
    return Event("error", message=message)


class Cancelled(Exception):
    """Raised inside a pipeline when its cancel event is set."""
