"""Every screen and modal, for each simulated profile, at 80×24 and 120×40 (deterministic inputs)."""

from __future__ import annotations

import pytest
from apps import feed_samples, settle, sim_app
from test_compare import store_fixed_results
from test_run_screen import inject_jobs

PROFILES = ["none", "h100", "gb10"]
SIZES = [(80, 24), (120, 40)]
SCREENS = ["help", "models", "plan", "jobs", "compare", "server-dialog"]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("screen", SCREENS)
def test_screen(snap_compare, isolated_user_dirs, screen, profile, size):
    if screen == "compare":
        store_fixed_results(isolated_user_dirs / "data")
    app = sim_app(profile)

    async def run_before(pilot):
        await feed_samples(app, pilot, 3)
        await settle(app, pilot)
        if screen == "jobs":
            await inject_jobs(app, pilot)
        elif screen == "server-dialog":
            await pilot.press("j", "a")
        else:
            await pilot.press({"help": "question_mark", "models": "m", "plan": "p", "compare": "c"}[screen])
        await settle(app, pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)
