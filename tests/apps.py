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


async def feed_samples(app: QExplorerApp, pilot, count: int = HISTORY_SAMPLES) -> None:
    """Deliver samples through the production message, one at a time."""
    await app.workers.wait_for_complete()  # the catalog scan started at mount
    for _ in range(count):
        app.post_message(TelemetrySampled(app.sources.sampler.sample()))
        await pilot.pause()
    await pilot.pause()


async def settle(app: QExplorerApp, pilot) -> None:
    """Wait for background workers (catalog scan, samples) and the resulting refresh."""
    await app.workers.wait_for_complete()
    await pilot.pause()
    await pilot.pause()
