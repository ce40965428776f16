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


@pytest.mark.parametrize("profile", ["gb10", "gb10-pagecache", "h100"])
async def test_memfree_is_shown_beside_memavailable_on_unified_memory(profile):
    """Unified memory: the pool's legend reads "avail X GiB (MemFree Y GiB)", the MemFree figure in the danger
    style under the guard's 8 GiB floor; a discrete card's host bar keeps its legend."""
    from qexplorer.core.telemetry import MEMFREE_FLOOR_BYTES
    from qexplorer.core.units import format_gib

    app = sim_app(profile)
    now = [0.0]
    app.sources.sampler.host.machine.monotonic = lambda: now[0]  # the page cache's growth, on a clock of ours
    async with app.run_test(size=(120, 40)) as pilot:
        await feed_samples(app, pilot, 1)
        now[0] = 5.5  # the checkpoint is in page cache: MemFree 1 GiB, MemAvailable where it was
        await feed_samples(app, pilot, 1)
        free = app.snapshot.host.free_bytes
        bars = list(app.screen.query(MemoryBar))
        legend = "\n".join(bar.render().plain for bar in bars)
        if profile == "h100":
            assert "MemFree" not in legend and all(bar.breakdown.mem_free is None for bar in bars)
            return
        available = app.snapshot.host.available_bytes.value
        assert f"avail {format_gib(available)} (MemFree {format_gib(free.value)})" in legend
        assert bars[0].breakdown.mem_free_low is (free.value < MEMFREE_FLOOR_BYTES)
        assert bars[0].breakdown.mem_free_low is (profile == "gb10-pagecache")


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
