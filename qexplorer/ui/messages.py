"""Typed messages that carry core data into the UI."""

from __future__ import annotations

from textual.message import Message

from qexplorer.core.catalog import CatalogEntry
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
