"""Dashboard: snapshots for each profile and size, and pilot tests of its keys."""

from __future__ import annotations

import pytest
from apps import feed_samples, sim_app

from qexplorer.ui.widgets.memory_bar import MemoryBar

SIZES = [(80, 24), (120, 40)]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("profile", ["none", "h100", "gb10"])
def test_dashboard_snapshot(snap_compare, profile, size):
    app = sim_app(profile)

    async def run_before(pilot):
        await feed_samples(app, pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("theme", ["qexplorer-light", "qexplorer-contrast"])
def test_dashboard_theme_snapshot(snap_compare, theme):
    app = sim_app("gb10", theme=theme)

    async def run_before(pilot):
        await feed_samples(app, pilot)

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_help_snapshot(snap_compare):
    app = sim_app("gb10")

    async def run_before(pilot):
        await feed_samples(app, pilot, 3)
        await pilot.press("question_mark")
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


async def test_unified_bar_shows_process_sum_and_refresh_keys():
    app = sim_app("gb10")
    async with app.run_test(size=(80, 24)) as pilot:
        await feed_samples(app, pilot, 2)
        bar = app.screen.query_one(MemoryBar)
        gpu = bar.breakdown.segments[0]
        assert gpu.label == "GPU"
        assert gpu.bytes == app.snapshot.devices[0].gpu_used_bytes.value
        assert app.refresh_s == 1.0
        await pilot.press("minus")
        assert app.refresh_s == 2.0
        await pilot.press("plus", "plus", "plus", "plus")
        assert app.refresh_s == 0.25
        await pilot.press("space")
        assert app.paused
        await pilot.press("question_mark")
        assert type(app.screen).__name__ == "HelpScreen"
        await pilot.press("escape")
        assert type(app.screen).__name__ == "DashboardScreen"


async def test_live_sampling_runs_in_a_thread_and_fills_history():
    from qexplorer.core.settings import Settings
    from qexplorer.ui.app import make_app
    from qexplorer.ui.sources import Sources

    settings = Settings(refresh_s=0.25)
    app = make_app(settings, Sources.for_profile("h100", settings))
    async with app.run_test(size=(80, 24)) as pilot:
        for _ in range(40):
            await pilot.pause(0.05)
            if len(app.history) >= 2:
                break
        await app.workers.wait_for_complete()
        assert len(app.history) >= 2
        assert app.snapshot.simulated == "h100"
