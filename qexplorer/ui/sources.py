"""What the app reads from: the one seam where real and simulated sources enter.

Tests build :class:`Sources` around simulated machines; the CLI builds it for
this machine or for ``--simulate PROFILE``. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qexplorer.core.catalog import Catalog
from qexplorer.core.settings import Settings
from qexplorer.core.simulate import make_sampler
from qexplorer.core.telemetry import TelemetrySampler


@dataclass
class Sources:
    sampler: TelemetrySampler
    catalog: Catalog = field(default_factory=Catalog)

    @classmethod
    def for_profile(cls, profile: str | None, settings: Settings) -> Sources:
        return cls(sampler=make_sampler(profile, reserve_bytes=settings.reserve_bytes),
                   catalog=Catalog(extra_paths=settings.models))
