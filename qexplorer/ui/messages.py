"""Typed messages that carry core data into the UI."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.message import Message

if TYPE_CHECKING:  # type hints only: the job machinery loads when the first job starts
    from qexplorer.core.catalog import CatalogEntry
    from qexplorer.core.compare import CompareRow
    from qexplorer.core.jobs.queue import JobView
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


class MachineSampled(Message):
    """Under ``--simulate``: a snapshot of the real machine, which plans the real jobs the app starts."""

    def __init__(self, snapshot: TelemetrySnapshot) -> None:
        super().__init__()
        self.snapshot = snapshot

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, MachineSampled)


class CatalogScanned(Message):
    """The catalog's entries, read in a thread (no weights loaded)."""

    def __init__(self, entries: tuple[CatalogEntry, ...]) -> None:
        super().__init__()
        self.entries = entries


class JobChanged(Message):
    """A job's new state, as the core job queue saw it (a frozen view; the newest revision wins)."""

    def __init__(self, view: JobView) -> None:
        super().__init__()
        self.view = view


class ResultsLoaded(Message):
    """Rows for the compare screen, read from the results store in a thread (None: could not read)."""

    def __init__(self, rows: tuple[CompareRow, ...] | None, error: str | None) -> None:
        super().__init__()
        self.rows = rows
        self.error = error
