"""The run screen: snapshots from injected job messages, and real jobs through the app."""

from __future__ import annotations

import os
import signal
import time

import pytest
from apps import feed_samples, settle, sim_app

from qexplorer.core import events
from qexplorer.core.bench import BenchConfig
from qexplorer.core.jobs import JobOutcome, MemorySample
from qexplorer.core.pipeline import JobSpec
from qexplorer.core.results import ResultsStore
from qexplorer.core.units import GIB, MIB
from qexplorer.ui.jobstate import JobState
from qexplorer.ui.messages import JobEventMessage, JobFinished, JobMemoryMessage
from qexplorer.ui.screens.run import RunScreen


async def inject_jobs(app, pilot) -> None:
    """Two jobs: one finished, one mid-benchmark, fed through the production messages."""
    bench = BenchConfig.quick()
    for job_id, key, label in ((1, "q8_0", "GGUF Q8_0"), (2, "int8", "INT8 w-only")):
        spec = JobSpec(model_ref="default", precision=key, data_dir="/nonexistent", bench=bench,
                       planned_peak_bytes=int(1.1 * GIB))
        app.jobs.append(JobState(id=job_id, spec=spec, label=label))
    for second in range(12):
        rss = int((0.1 + 0.08 * second) * GIB)
        app.post_message(JobMemoryMessage(2, MemorySample(float(second), rss, None,
                                                          int(72 * GIB - rss), "load")))
    app.post_message(JobEventMessage(2, events.phase("benchmark", "pp64 / tg16 × 2")))
    app.post_message(JobEventMessage(2, events.progress("benchmark", 1, 2, "repetition 1")))
    record = {"decode_tok_s": {"mean": 141.7, "sd": 3.9, "n": 2}, "peak_rss_bytes": 247 * MIB}
    outcome = JobOutcome(job=app.jobs[0].spec, status="ok", record=record, error=None, peak_rss_bytes=247 * MIB)
    app.post_message(JobFinished(1, outcome))
    await pilot.pause()
    app.jobs_version += 1
    await pilot.press("j")
    await pilot.pause()
    await pilot.press("down")
    await pilot.pause()


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_run_screen_snapshot(snap_compare, size):
    app = sim_app("gb10")

    async def run_before(pilot):
        await feed_samples(app, pilot, 2)
        await settle(app, pilot)
        await inject_jobs(app, pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


async def wait_jobs(app, pilot, timeout_s: float = 240) -> None:
    started = time.monotonic()
    while not all(j.finished for j in app.jobs) and time.monotonic() - started < timeout_s:
        await pilot.pause(0.2)
    await app.workers.wait_for_complete()
    await pilot.pause()


@pytest.mark.e2e
async def test_sigkill_mid_run_leaves_the_app_alive_and_the_next_job_runs(isolated_user_dirs):
    store = ResultsStore.in_dir(isolated_user_dirs / "data")
    earlier = store.add({"model_name": "earlier", "model_path": "x", "precision": "bf16", "family": "torch"})
    app = sim_app("none")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        app.chosen = frozenset({"q8_0", "q4_k_m"})
        app.quick_bench = True
        await pilot.press("p")
        await pilot.press("r")
        assert isinstance(app.screen, RunScreen)
        started = time.monotonic()
        while app.jobs[0].phase != "load" and time.monotonic() - started < 60:
            await pilot.pause(0.05)
        pid = next(p.pid for p in app.sources.sampler.sample().processes if p.own_job)
        os.kill(pid, signal.SIGKILL)
        await wait_jobs(app, pilot)
        assert [j.status for j in app.jobs] == ["failed", "ok"]
        assert "SIGKILL" in app.jobs[0].outcome.error
        await pilot.press("d")  # the app still answers
        assert type(app.screen).__name__ == "DashboardScreen"
    assert store.integrity_ok()
    rows = store.all(include_failed=True)
    assert rows[0].id == earlier and [r.status for r in rows[1:]] == ["failed", "ok"]


@pytest.mark.e2e
async def test_cancel_from_the_keyboard(isolated_user_dirs):
    app = sim_app("none")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        app.chosen = frozenset({"q8_0", "q6_k"})
        app.quick_bench = True
        await pilot.press("p", "r")
        await pilot.press("K")  # cancel all: the running one and the queued one
        await wait_jobs(app, pilot, 60)
        assert {j.status for j in app.jobs} == {"cancelled"}
