"""Building the app for pilot and snapshot tests: simulated sources, no live timer."""

from __future__ import annotations

from qexplorer.core.settings import Settings
from qexplorer.ui.app import QExplorerApp, make_app
from qexplorer.ui.messages import TelemetrySampled
from qexplorer.ui.sources import Sources

HISTORY_SAMPLES = 30


def sim_app(profile: str, **settings_values) -> QExplorerApp:
    settings = Settings(**settings_values)
    return make_app(settings, Sources.for_profile(profile, settings), live=False)


async def wait_for_catalog(app: QExplorerApp, pilot, timeout_s: float = 30.0) -> None:
    """The catalog scan starts shortly after the first frame; wait until its result has arrived."""
    import time

    deadline = time.monotonic() + timeout_s
    while app.catalog_scanning and not app.dashboard_only and time.monotonic() < deadline:
        await pilot.pause(0.05)
    await app.workers.wait_for_complete()


async def feed_samples(app: QExplorerApp, pilot, count: int = HISTORY_SAMPLES) -> None:
    """Deliver samples through the production message, one at a time."""
    await wait_for_catalog(app, pilot)
    for _ in range(count):
        app.post_message(TelemetrySampled(app.sources.sampler.sample()))
        await pilot.pause()
    await pilot.pause()


async def settle(app: QExplorerApp, pilot) -> None:
    """Wait for background workers (catalog scan, samples) and the resulting refresh."""
    await wait_for_catalog(app, pilot)
    await pilot.pause()
    await pilot.pause()
