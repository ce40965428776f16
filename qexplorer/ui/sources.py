"""What the app reads from: the one seam where real and simulated sources enter.

Tests build :class:`Sources` around simulated machines; the CLI builds it for
this machine or for ``--simulate PROFILE``. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qexplorer.core.catalog import Catalog
from qexplorer.core.settings import Settings
from qexplorer.core.simulate import make_sampler
from qexplorer.core.telemetry import TelemetrySampler, local_sampler


@dataclass
class Sources:
    """``sampler`` is what the screens draw (a simulated profile under ``--simulate``); ``guard`` is always this
    machine: it plans and guards the real jobs the app starts."""

    sampler: TelemetrySampler
    catalog: Catalog = field(default_factory=Catalog)
    guard: TelemetrySampler | None = None

    def __post_init__(self) -> None:
        if self.guard is None:
            self.guard = self.sampler if self.sampler.simulated is None else local_sampler(self.sampler.reserve_bytes)

    @property
    def separate_guard(self) -> bool:
        """The screens draw a simulated machine; the real one is sampled apart for the jobs."""
        return self.guard is not self.sampler

    @classmethod
    def for_profile(cls, profile: str | None, settings: Settings) -> Sources:
        return cls(sampler=make_sampler(profile, reserve_bytes=settings.reserve_bytes),
                   catalog=Catalog(extra_paths=settings.models))
