"""GPU memory and the guard, through simulated NVML and hosts: the trend rule on a plunging GB10, the MemFree rule
on a GB10 whose page cache takes the free pages, the page cache dropped before a load, GPU memory attributed in a
container, the shim, integrated names and ATS on a GH200, and a simulated screen that never guards a real job."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil
import pytest
from apps import settle, sim_app

from qexplorer.cli import main
from qexplorer.core.domain.record import ModelIdentity, RunRecord
from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.jobs.guard import FAST_INTERVAL_S, GuardSample, MemoryGuard
from qexplorer.core.jobs.runner import UNIFIED_KILL_NOTE, JobRunner
from qexplorer.core.jobs.watch import GPU_BY_DELTA, GPU_BY_PID, discrete_free_bytes, guard_sample
from qexplorer.core.kinds import Family
from qexplorer.core.pagecache import drop_page_cache
from qexplorer.core.results import ResultsStore
from qexplorer.core.simulate import SimulatedNvml, SimulatedProcess, machine_for, simulated_sampler
from qexplorer.core.telemetry import MEMFREE_FLOOR_BYTES, unified_memory_here
from qexplorer.core.units import GIB, MIB

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
LOADER = [sys.executable, "-c", "import time; time.sleep(12)"]  # outlives the page cache's 5.5 s of growth
# a worker that starts a child and lives for 3 s: the child stands for the vLLM server a worker starts
PARENT_OF_SERVER = [sys.executable, "-c", "import subprocess, sys, time; "
                    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(3)"]


def job(tmp_path: Path, **kw) -> JobSpec:
    return JobSpec(model_ref="default", precision="q8_0", data_dir=str(tmp_path), **kw)


# ----------------------------------------------------------------------------- the guard's rules
def test_the_trend_rule_needs_a_steep_fall_and_little_time_left():
    guard = MemoryGuard()
    for i in range(12):  # flat with allocator noise: never
        assert guard.check(GuardSample(i * 0.25, 20 * GIB + (i % 3) * 200 * MIB)) is None
    guard = MemoryGuard()
    for i in range(12):  # falling 256 MiB/s with 10 GiB left: 40 s to go, and too slow to be a plunge
        assert guard.check(GuardSample(i * 0.25, 10 * GIB - i * 64 * MIB)) is None
    guard = MemoryGuard()
    stops = [guard.check(GuardSample(i * 0.25, 12 * GIB - i * GIB)) for i in range(12)]  # 4 GiB/s
    first = next(i for i, stop in enumerate(stops) if stop is not None)
    assert stops[first].rule == "trend" and 12 * GIB - first * GIB > 0  # before the level rule could act
    assert MemoryGuard().check(GuardSample(0.0, -1)).rule == "level"


def test_the_vram_rule_acts_only_for_a_job_on_the_card():
    guard = MemoryGuard()
    assert guard.check(GuardSample(0.0, 50 * GIB, vram_free_bytes=100 * MIB, job_gpu_bytes=None)) is None
    assert guard.check(GuardSample(0.25, 50 * GIB, vram_free_bytes=100 * MIB, job_gpu_bytes=GIB)).rule == "vram"


@pytest.mark.timing
def test_a_plunging_gb10_load_is_stopped_by_the_trend_before_headroom_reaches_zero(tmp_path: Path):
    """vLLM #54200: free memory 29 → 2.5 GiB in 9 s. With an 8 GiB reserve the level rule would act after
    about 7 s; the trend acts seconds earlier, with headroom still above zero. The runner samples at 4 Hz
    while the job loads although the user's rate is 1 s."""
    sampler = simulated_sampler("gb10-plunge", reserve_bytes=8 * GIB)
    runner = JobRunner(sampler=sampler, interval_s=1.0, worker_command=SLEEPER)
    started = time.monotonic()
    outcome = runner.run(job(tmp_path, planned_peak_bytes=20 * GIB))
    assert outcome.status == "stopped", outcome.error
    assert "falling at" in outcome.error and "would reach the safety reserve" in outcome.error
    # the trend acted first: every sample, the last included, still had headroom (the level rule acts below 0)
    assert min(s.headroom_bytes for s in outcome.memory) > 0
    assert time.monotonic() - started < 9.0  # the plunge lasts 9 s
    gaps = [b.elapsed_s - a.elapsed_s for a, b in zip(outcome.memory, outcome.memory[1:], strict=False)]
    # sampled at the loading rate, not the user's 1 s (wide: a busy 2-core box delays a few samples)
    assert sum(gaps) / len(gaps) < FAST_INTERVAL_S + 0.1 and max(gaps) < 1.0


# ----------------------------------------------------------------------------- MemFree on unified memory
def _memfree_series(guard: MemoryGuard, mem_free_at, unified: bool = True) -> list:
    """16 samples at 4 Hz with the headroom flat at 14.5 GiB (MemAvailable 22.5 GiB, vLLM #56824) and MemFree as
    given: what the guard says to each."""
    return [guard.check(GuardSample(i * 0.25, int(14.5 * GIB), mem_free_bytes=mem_free_at(i), unified=unified))
            for i in range(16)]


def test_the_memfree_rule_needs_unified_memory_memfree_under_the_floor_and_a_fall():
    def falling(i: int) -> int:  # 2 GiB/s of checkpoint into page cache: 12 GiB free, under 8 GiB from the 9th
        return 12 * GIB - i * 512 * MIB

    stops = _memfree_series(MemoryGuard(), falling)
    first = next(i for i, stop in enumerate(stops) if stop is not None)
    assert stops[first].rule == "memfree"
    assert falling(first) < MEMFREE_FLOOR_BYTES <= falling(first - 1)  # at the first sample under the floor
    assert "MemFree fell to 7.5 GiB, under the 8.0 GiB floor, and is still falling at 2.0 GiB/s" in stops[first].reason
    # a discrete card or a CPU-only machine keeps the rules it had
    assert not any(_memfree_series(MemoryGuard(), falling, unified=False))
    # low but steady: a Linux host whose page cache fills memory, as it should
    assert not any(_memfree_series(MemoryGuard(), lambda i: 3 * GIB + (i % 3) * 30 * MIB))
    # falling fast but far above the floor: not yet
    assert not any(_memfree_series(MemoryGuard(), lambda i: 40 * GIB - i * 512 * MIB))
    # the rules before this one (level, trend, VRAM) never see it
    assert not any(_memfree_series(MemoryGuard(memfree_floor_bytes=None), falling))


def test_the_older_rules_alone_let_the_page_cache_wedge_through():
    """The simulated GB10 load, sampled at 4 Hz on a clock driven by hand until its page cache stops growing:
    MemAvailable stays flat while MemFree falls from 12 to 1 GiB. The level, trend and VRAM rules never fire; the
    MemFree rule fires at the first sample under 8 GiB."""
    sampler = simulated_sampler("gb10-pagecache", reserve_bytes=8 * GIB)
    now = [0.0]
    sampler.host.machine.monotonic = lambda: now[0]
    older, full = MemoryGuard(memfree_floor_bytes=None), MemoryGuard()
    samples, stops = [], []
    for i in range(30):  # 7.5 s; the page cache grows for 5.5 s
        now[0] = i * FAST_INTERVAL_S
        sample = guard_sample(sampler.sample(), now[0], job_gpu_bytes=None)
        samples.append(sample)
        assert older.check(sample) is None, f"an older rule fired at {now[0]} s"
        stops.append(full.check(sample))
    assert all(s.unified and s.vram_free_bytes is None for s in samples)
    assert {s.host_headroom_bytes for s in samples} == {int(14.5 * GIB)}  # MemAvailable 22.5 GiB, flat
    assert samples[0].mem_free_bytes == 12 * GIB and samples[-1].mem_free_bytes == GIB
    first = next(i for i, stop in enumerate(stops) if stop is not None)
    assert stops[first].rule == "memfree"
    assert samples[first].mem_free_bytes < MEMFREE_FLOOR_BYTES <= samples[first - 1].mem_free_bytes


@pytest.mark.timing
def test_a_page_cache_wedge_on_gb10_is_stopped_by_the_memfree_rule(tmp_path: Path):
    """A real job guarded by the simulated GB10 load: stopped while MemAvailable is flat and headroom is 14.5 GiB,
    once MemFree is under 8 GiB and falling, with the reason and the reboot warning in its message."""
    sampler = simulated_sampler("gb10-pagecache", reserve_bytes=8 * GIB)
    runner = JobRunner(sampler=sampler, interval_s=1.0, worker_command=LOADER)
    started = time.monotonic()
    outcome = runner.run(job(tmp_path, planned_peak_bytes=20 * GIB))
    assert outcome.status == "stopped", outcome.error
    assert "MemFree fell to" in outcome.error and "under the 8.0 GiB floor" in outcome.error
    assert outcome.error.endswith(UNIFIED_KILL_NOTE) and "reboot" in UNIFIED_KILL_NOTE
    assert {s.headroom_bytes for s in outcome.memory} == {int(14.5 * GIB)}  # the level and trend rules saw nothing
    assert outcome.memory[-1].mem_free_bytes < MEMFREE_FLOOR_BYTES <= outcome.memory[0].mem_free_bytes
    assert time.monotonic() - started < 5.5  # before the page cache stopped growing (at 2 GiB/s: ~2 s + a window)


def test_a_guard_stop_on_a_discrete_card_does_not_warn_about_a_reboot(tmp_path: Path):
    sampler = simulated_sampler("h100", reserve_bytes=8 * GIB)
    sampler.host.machine.extra_used_bytes = sampler.host.machine.mem_available_bytes()  # headroom below zero
    outcome = JobRunner(sampler=sampler, interval_s=0.2, worker_command=SLEEPER).run(job(tmp_path))
    assert outcome.status == "stopped" and "host headroom fell to" in outcome.error
    assert UNIFIED_KILL_NOTE not in outcome.error


# ----------------------------------------------------------------------------- the page cache before a load
def test_as_root_the_page_cache_is_synced_and_dropped(tmp_path: Path):
    fake = tmp_path / "drop_caches"
    fake.write_text("0")
    calls: list[str] = []
    result = drop_page_cache(fake, euid=0, sync=lambda: calls.append("sync"))
    assert result.dropped and calls == ["sync"] and fake.read_text() == "1"
    assert result.message.startswith("Dropped the page cache before loading")


def test_without_root_or_a_writable_file_the_page_cache_is_not_dropped_and_says_why(tmp_path: Path):
    fake = tmp_path / "drop_caches"
    fake.write_text("0")

    def no_sync() -> None:
        raise AssertionError("nothing to sync for when nothing is dropped")

    user = drop_page_cache(fake, euid=1000, sync=no_sync)
    assert not user.dropped and fake.read_text() == "0"
    assert user.message == (f"The page cache was not dropped before loading: writing {fake} needs root and qexplorer "
                            f"runs as uid 1000 (run `sync; echo 1 | sudo tee {fake}` first to do it by hand).")
    read_only = drop_page_cache(tmp_path / "no-such-dir" / "drop_caches", euid=0, sync=lambda: None)
    assert not read_only.dropped and "failed (No such file or directory" in read_only.message


def test_the_pipeline_drops_the_page_cache_before_a_load_on_unified_memory_only(tmp_path: Path):
    from qexplorer.core.pipeline import before_unified_load

    fake = tmp_path / "drop_caches"
    fake.write_text("0")
    events = list(before_unified_load(unified=lambda: True,
                                      drop=lambda: drop_page_cache(fake, euid=0, sync=lambda: None)))
    assert [(e.level, e.message[:31]) for e in events] == [("info", "Dropped the page cache before l")]
    assert fake.read_text() == "1"
    events = list(before_unified_load(unified=lambda: True,
                                      drop=lambda: drop_page_cache(fake, euid=1000, sync=lambda: None)))
    assert [e.level for e in events] == ["warning"] and "not dropped" in events[0].message

    def never() -> None:
        raise AssertionError("no page cache is dropped for a discrete card or a CPU")

    assert list(before_unified_load(unified=lambda: False, drop=never)) == []


# ----------------------------------------------------------------------------- attribution
def _add_gpu_process(machine, pid_of, gpu_bytes: int):
    """on_memory hook: once the job runs, the simulated NVML lists its process (found by ``pid_of``)."""
    added: list[int] = []

    def hook(_sample) -> None:
        if not added:
            pid = pid_of()
            if pid:
                machine.processes.append(SimulatedProcess(pid, "vllm", 0, gpu_bytes=gpu_bytes))
                added.append(pid)

    return hook, added


def test_gpu_memory_of_the_jobs_process_tree_is_attributed_by_pid(tmp_path: Path):
    sampler = simulated_sampler("gb10")
    runner = JobRunner(sampler=sampler, interval_s=0.2, worker_command=PARENT_OF_SERVER)

    def grandchild() -> int | None:
        try:
            kids = psutil.Process(runner.current_pid).children()
        except psutil.Error:
            return None
        return kids[0].pid if kids else None

    hook, added = _add_gpu_process(sampler.host.machine, grandchild, 6 * GIB)
    outcome = runner.run(job(tmp_path), on_memory=hook)
    assert added, "the worker's child was never seen"
    assert outcome.peak_gpu_bytes == 6 * GIB and outcome.gpu_source == GPU_BY_PID


def test_in_a_container_the_jobs_gpu_memory_is_still_attributed(tmp_path: Path):
    """NVML lists host PIDs (ours + 400000), which match nothing here: the device's growth is the job's."""
    sampler = simulated_sampler("gb10-container")
    machine = sampler.host.machine
    runner = JobRunner(sampler=sampler, interval_s=0.2,
                       worker_command=[sys.executable, "-c", "import time; time.sleep(2)"])
    hook, added = _add_gpu_process(machine, lambda: runner.current_pid and runner.current_pid, 5 * GIB)
    outcome = runner.run(job(tmp_path), on_memory=hook)
    assert added and sampler.sample().foreign_gpu_pids
    assert outcome.gpu_source == GPU_BY_DELTA
    # the other processes' wobble moves the device total a little; the job's 5 GiB is what grew
    assert 4.5 * GIB <= outcome.peak_gpu_bytes <= 6.6 * GIB


# ----------------------------------------------------------------------------- telemetry cases
@pytest.mark.parametrize("profile", ["gb10-shim", "jetson", "thor"])
def test_integrated_gpus_are_unified_even_when_a_shim_answers_the_memory_query(profile):
    snapshot = simulated_sampler(profile, reserve_bytes=8 * GIB).sample()
    device = snapshot.devices[0]
    assert device.unified is True
    assert device.headroom_bytes.value == snapshot.host.available_bytes.value - 8 * GIB  # not the shim's "free"
    assert device.gpu_used_bytes.source == "nvml processes"
    if profile == "gb10-shim":
        assert "a shim, not used" in device.memory_note


def test_gh200_has_ats_addressing_but_its_own_hbm_and_is_not_unified():
    """P2-10 (b): ATS alone is not one pool with the host. GH200's memory query answers; its free HBM is the
    headroom a GPU job fits in, and the VRAM rule applies."""
    snapshot = simulated_sampler("gh200", reserve_bytes=8 * GIB).sample()
    device = snapshot.devices[0]
    assert device.unified is False and not snapshot.unified
    assert device.memory_total_bytes.value == 97_871 * MIB and device.memory_total_bytes.source == "nvml"
    assert snapshot.headroom_for(on_gpu=True) == device.headroom_bytes and device.headroom_bytes.source == "nvml"
    assert discrete_free_bytes(snapshot) == device.headroom_bytes.value  # the VRAM rule has its figure
    assert not guard_sample(snapshot, 0.0, None).unified  # the MemFree rule stays off
    assert simulated_sampler("gb10").sample().devices[0].unified is True
    assert unified_memory_here(SimulatedNvml(machine_for("gh200"))) is False
    assert unified_memory_here(SimulatedNvml(machine_for("gb10"))) is True
    assert unified_memory_here(SimulatedNvml(machine_for("none"))) is False  # no NVML: not unified


def test_shmem_and_mlocked_are_shown_and_not_counted_as_reclaimable():
    machine = machine_for("gb10")
    snapshot = simulated_sampler("gb10").sample()
    host = snapshot.host
    assert host.shmem_bytes.value == machine.shmem_bytes and host.mlocked_bytes.value == machine.mlocked_bytes
    assert host.reclaimable_cache_bytes.value == machine.cached_bytes - machine.shmem_bytes + machine.sreclaimable_bytes


# ----------------------------------------------------------------------------- --simulate draws only
def test_a_simulated_screen_does_not_guard_a_real_job(tmp_path: Path):
    """The screen shows a GB10 with no headroom left; the job is guarded by the (healthy) real host and runs."""
    shown = simulated_sampler("gb10", reserve_bytes=8 * GIB)
    shown.host.machine.extra_used_bytes = shown.host.machine.mem_available_bytes()  # 0 available on screen
    assert shown.sample().host_headroom_bytes.value < 0
    real = simulated_sampler("none", reserve_bytes=GIB)  # stands for this machine, with room
    seen: list[bool] = []
    runner = JobRunner(sampler=real, display=shown, interval_s=0.2,
                       worker_command=[sys.executable, "-c", "import time; time.sleep(1)"])
    outcome = runner.run(job(tmp_path), on_memory=lambda _s: seen.append(runner.current_pid in shown.own_pids))
    assert outcome.status == "failed" and "without a result" in outcome.error  # ran to its end: not stopped
    assert seen and all(seen) and not shown.own_pids  # marked as a job on screen while it ran


def test_the_app_guards_and_plans_real_jobs_on_the_real_machine():
    app = sim_app("gb10")
    assert app.sources.sampler.simulated == "gb10"
    assert app.sources.guard.simulated is None
    assert app.job_queue.runner.sampler is app.sources.guard
    assert app.job_queue.runner.display is app.sources.sampler


# ----------------------------------------------------------------------------- where the GPU peak shows
def _record(precision: str, gpu_bytes: int) -> RunRecord:
    from qexplorer.core.catalog import bundled_model_path

    return RunRecord(model=ModelIdentity("SmolLM2-135M-Instruct (Q4_1)", str(bundled_model_path())),
                     precision=precision, precision_label=precision, family=Family.TORCH).with_memory(
        weight_bytes=270 * MIB, peak_rss_bytes=900 * MIB, peak_gpu_bytes=gpu_bytes, peak_gpu_source=GPU_BY_PID,
        planned_peak_bytes=GIB)


async def test_the_gpu_peak_is_on_the_compare_screen_and_in_results_json(isolated_user_dirs, capsys):
    store = ResultsStore.in_dir(isolated_user_dirs / "data")
    store.add(_record("bf16", int(1.5 * GIB)))
    assert main(["results", "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)["results"][0]
    assert row["peak_gpu_bytes"] == int(1.5 * GIB) and row["peak_gpu_source"] == GPU_BY_PID
    app = sim_app("h100")
    async with app.run_test(size=(160, 40)) as pilot:
        await settle(app, pilot)
        await pilot.press("c")
        await settle(app, pilot)
        table = app.screen.query_one("#compare-table")
        cells = [str(c) for c in table.get_row_at(0)]
        assert "1.5 GiB" in cells and "900.0 MiB" in cells


def test_the_gpu_check_script_says_no_gpu_in_one_sentence_here():
    import subprocess

    from qexplorer.core.telemetry import local_sampler

    if local_sampler().sample().devices:
        pytest.skip("this machine has a GPU: the script checks it instead")
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("No GPU here (") and lines[0].endswith("nothing to check.")
