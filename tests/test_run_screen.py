"""The run screen: snapshots from injected job messages, and real jobs through the app."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace

import pytest
from apps import feed_samples, settle, sim_app

from qexplorer.core.domain.bench import Stat
from qexplorer.core.domain.events import Phase, Progress
from qexplorer.core.domain.record import HardwareFacts, ModelIdentity, RunRecord, Speed
from qexplorer.core.eta import JobEstimate, PhaseEstimate, Source
from qexplorer.core.jobs.queue import JobView
from qexplorer.core.jobs.watch import GPU_BY_PID, MemorySample
from qexplorer.core.kinds import Family, JobAction, JobStatus
from qexplorer.core.results import ResultsStore
from qexplorer.core.units import GIB, MIB
from qexplorer.ui.messages import JobChanged
from qexplorer.ui.screens.jobs import JobsScreen


async def inject_jobs(app, pilot) -> None:
    """Two jobs: one finished, one mid-benchmark, fed as the queue's views through the production message."""
    revision = 0

    def post(view: JobView) -> JobView:
        nonlocal revision
        revision += 1
        view = JobView(**{**view.__dict__, "revision": revision})
        app.post_message(JobChanged(view))
        return view

    app.clock = lambda: 1000.0  # "time left" against a fixed clock: the snapshot must not depend on when it ran
    defaults, here = Source.DEFAULTS, Source.MEASURED
    estimate = JobEstimate("int8", (PhaseEstimate("start", "start", 1, 6.0, defaults),
                                    PhaseEstimate("load", "load:transformers", 0.15, 3.0, defaults),
                                    PhaseEstimate("benchmark", "benchmark:transformers", 24.0, 12.0, defaults),
                                    PhaseEstimate("calibrate", "calibrate", 1, 3.0, defaults)))
    queued = JobEstimate("q4_k_m", (PhaseEstimate("start", "start", 1, 6.0, here),
                                    PhaseEstimate("benchmark", "benchmark:llama.cpp", 24.0, 4.0, here)))
    done = post(JobView(id=1, label="GGUF Q8_0", action=JobAction.RUN, planned_peak_bytes=int(1.1 * GIB)))
    running = post(JobView(id=2, label="INT8 W8A8", action=JobAction.RUN, planned_peak_bytes=int(1.1 * GIB),
                           estimate=estimate))
    post(JobView(id=3, label="GGUF Q4_K_M", action=JobAction.RUN, estimate=queued))
    running = post(running.applied(Phase("load", "loading")))
    for second in range(12):
        rss = int((0.1 + 0.08 * second) * GIB)
        gpu = int(0.15 * second * GIB)  # NVML's per-process figure on GB10: not part of RSS
        running = post(running.sampled(MemorySample(float(second), rss, gpu, int(72 * GIB - rss - gpu), "load",
                                                    GPU_BY_PID)))
    running = post(replace(running.applied(Phase("benchmark", "pp64 / tg16 × 2")), phase_started_s=995.0))
    running = post(running.applied(Progress("benchmark", 1, 2, "repetition 1")))
    speed = Speed(prefill_tok_s=Stat(900.0, 10.0, 2), decode_tok_s=Stat(141.7, 3.9, 2), ttft_s=Stat(0.08, 0.0, 2),
                  prompt_tokens=64, gen_tokens=16, repetitions=2, threads=2)
    record = RunRecord(model=ModelIdentity("SmolLM2", "/m.gguf"), precision="q8_0", precision_label="GGUF Q8_0",
                       family=Family.GGUF, speed=speed, hardware=HardwareFacts(gpu_unified=True)).with_memory(
        peak_rss_bytes=247 * MIB, peak_gpu_bytes=820 * MIB, planned_peak_bytes=int(1.1 * GIB))
    post(JobView(**{**done.__dict__, "status": JobStatus.OK, "phase": "done", "record": record,
                    "peak_rss_bytes": 247 * MIB, "peak_gpu_bytes": 820 * MIB,
                    "estimate": JobEstimate("q8_0", (PhaseEstimate("benchmark", "benchmark:llama.cpp", 24, 30.0,
                                                                   Source.DEFAULTS),)), "took_s": 41.0,
                    "message": "stored; it appears on the compare screen (c)"}))
    await pilot.pause()
    await pilot.press("j")
    await pilot.pause()


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_run_screen_snapshot(snap_compare, size):
    app = sim_app("gb10")

    async def run_before(pilot):
        await feed_samples(app, pilot, 2)
        await settle(app, pilot)
        await inject_jobs(app, pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


async def test_the_gpu_peak_and_the_plan_check_are_on_the_jobs_screen():
    app = sim_app("gb10")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await inject_jobs(app, pilot)
        table = app.screen.query_one("#job-table")
        done, running, queued = ([str(c) for c in table.get_row_at(i)] for i in range(3))
        assert "247.0 MiB" in done and "820.0 MiB" in done  # RSS and GPU side by side
        # 5 s into a 12 s benchmark, then 3 s of calibration: 10 s left; the queued job's 10 s estimate beside it
        assert "~10 s" in running and "~10 s" in queued
        assert "queue: 2 jobs, at most ~20 s left (estimated partly from defaults" in str(
            app.screen.query_one("#queue-eta").render())
        assert "1.6 GiB" in running  # the running job's GPU peak so far (11 × 0.15 GiB)
        await pilot.press("up")
        await pilot.pause()
        message = str(app.screen.query_one("#job-message").render())
        assert "GGUF Q8_0" in message
        assert "peak RSS + GPU 1.0 GiB measured vs 1.1 GiB planned (+6 %)" in message  # (1126 − 1067) / 1067
        assert "took 41 s, estimated 30 s" in message


async def wait_jobs(app, pilot, timeout_s: float = 240) -> None:
    started = time.monotonic()
    while not all(j.finished for j in app.jobs) and time.monotonic() - started < timeout_s:
        await pilot.pause(0.2)
    await app.workers.wait_for_complete()
    await pilot.pause()


@pytest.mark.e2e
async def test_sigkill_mid_run_leaves_the_app_alive_and_the_next_job_runs(isolated_user_dirs):
    store = ResultsStore.in_dir(isolated_user_dirs / "data")
    earlier = store.add(RunRecord(model=ModelIdentity("earlier", "x"), precision="bf16", precision_label="BF16",
                                  family=Family.TORCH))
    app = sim_app("none")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        app.chosen = frozenset({"q8_0", "q4_k_m"})
        app.quick_bench = True
        await pilot.press("p")
        await pilot.press("r")
        assert isinstance(app.screen, JobsScreen)
        started = time.monotonic()
        # mid-run: while it quantizes or loads (on an idle machine "load" alone can pass between two looks)
        while app.jobs[0].phase not in ("quantize", "load") and time.monotonic() - started < 60:
            await pilot.pause(0.05)
        assert app.jobs[0].status == "running"
        pid = next(p.pid for p in app.sources.sampler.sample().processes if p.own_job)
        os.kill(pid, signal.SIGKILL)
        await wait_jobs(app, pilot)
        assert [j.status for j in app.jobs] == ["failed", "ok"]
        assert "SIGKILL" in app.jobs[0].error
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
