"""What the UI keeps about each job: a view of the events, never a computation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qexplorer.core.events import Event
    from qexplorer.core.jobs import JobOutcome, MemorySample
    from qexplorer.core.pipeline import JobSpec


@dataclass
class JobState:
    id: int
    spec: JobSpec | None  # None: a server sweep (no worker process)
    label: str
    status: str = "queued"  # queued, running, ok, failed, cancelled, stopped, timeout
    phase: str = ""
    message: str = ""
    done: float = 0.0
    total: float = 0.0
    memory: list[MemorySample] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    outcome: JobOutcome | None = None

    def apply(self, event: Event) -> None:
        if event.type == "phase":
            self.status = "running"
            self.phase, self.message, self.done, self.total = event.phase, event.message, 0.0, 0.0
        elif event.type == "progress":
            self.done, self.total = event.done, event.total
            self.message = event.message or self.message
        elif event.type == "log":
            if event.level == "warning":
                self.warnings.append(event.message)
            self.message = event.message
        elif event.type == "error":
            self.message = event.message

    @property
    def peak_rss_bytes(self) -> int:
        measured = max((s.rss_bytes for s in self.memory), default=0)
        if self.outcome is not None:
            measured = max(measured, self.outcome.peak_rss_bytes)
        return measured

    @property
    def finished(self) -> bool:
        return self.status not in ("queued", "running")
