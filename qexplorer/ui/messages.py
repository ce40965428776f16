"""Typed messages that carry core data into the UI."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.message import Message

if TYPE_CHECKING:  # type hints only: the job machinery loads when the first job starts
    from qexplorer.core.catalog import CatalogEntry
    from qexplorer.core.events import Event
    from qexplorer.core.jobs import JobOutcome, MemorySample
    from qexplorer.core.telemetry import TelemetrySnapshot


class TelemetrySampled(Message):
    """A fresh snapshot from the sampling thread.

    Replaceable: if the UI falls behind, a queued older sample is dropped for the
    newer one rather than replayed (toolong's trick).
    """

    def __init__(self, snapshot: TelemetrySnapshot) -> None:
        super().__init__()
        self.snapshot = snapshot

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, TelemetrySampled)


class CatalogScanned(Message):
    """The catalog's entries, read in a thread (no weights loaded)."""

    def __init__(self, entries: tuple[CatalogEntry, ...]) -> None:
        super().__init__()
        self.entries = entries


class JobEventMessage(Message):
    """One event from a running job's worker."""

    def __init__(self, job_id: int, event: Event) -> None:
        super().__init__()
        self.job_id = job_id
        self.event = event


class JobMemoryMessage(Message):
    """One memory sample of a running job, taken by the parent from outside."""

    def __init__(self, job_id: int, sample: MemorySample) -> None:
        super().__init__()
        self.job_id = job_id
        self.sample = sample


class JobFinished(Message):
    """A job ended (ok, failed, cancelled, stopped by the guard or timed out) and was stored."""

    def __init__(self, job_id: int, outcome: JobOutcome, store_error: str | None = None) -> None:
        super().__init__()
        self.job_id = job_id
        self.outcome = outcome
        self.store_error = store_error


class ResultsLoaded(Message):
    """Rows for the compare screen, read from the results store in a thread (None: could not read)."""

    def __init__(self, rows: list | None, error: str | None) -> None:
        super().__init__()
        self.rows = rows
        self.error = error
