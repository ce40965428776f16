"""The load sweep as part of a job (issue 25): levels capped at the plan's capacity, its memory in the job's
planned peak, its cost in the ETA, its flags on the command line and its toggle on the plan screen."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from apps import feed_samples, settle, sim_app

from qexplorer.cli import main
from qexplorer.core.catalog import Catalog
from qexplorer.core.domain.bench import BenchConfig
from qexplorer.core.domain.load import LoadSweepSpec, ServiceObjective
from qexplorer.core.domain.phases import PhaseKind
from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.eta import estimate_jobs
from qexplorer.core.planner import PlanRequest, kv_bytes_per_token, plan_job_peak, plan_precision
from qexplorer.core.precisions import get
from qexplorer.core.serving.vllm_launch import kv_cache_bytes
from qexplorer.core.session import capped_load, plan_run
from qexplorer.core.simulate import simulated_sampler


def test_a_load_sweep_is_capped_at_the_plans_capacity_and_says_what_it_dropped():
    spec = Catalog().resolve("default")
    snapshot = simulated_sampler("none").sample()
    load = LoadSweepSpec(levels=(1, 2, 4, 8, 100_000))
    request = PlanRequest(context=80)
    capped = capped_load(load, spec, get("q8_0"), snapshot, request)
    capacity = plan_precision(spec, get("q8_0"), replace(request, context=load.context_tokens), snapshot).capacity
    assert capacity is not None and capacity.sequences is not None and 8 <= capacity.sequences < 100_000
    assert capped.levels == (1, 2, 4, 8) and capped.dropped == (100_000,) and capped.slots == 8
    assert capped_load(load, spec, get("q8_0"), None, request) == load  # no headroom known: nothing to cap by


def test_the_jobs_planned_peak_holds_the_sweeps_sequences():
    spec = Catalog().resolve("default")
    bench = BenchConfig.quick()
    load = LoadSweepSpec(levels=(1, 2, 4, 8), prompt_tokens=256, max_tokens=64)
    kv = kv_bytes_per_token(spec, "bf16")
    vllm = (plan_job_peak(spec, get("bf16"), bench, on_gpu=False, load=load)
            - plan_job_peak(spec, get("bf16"), bench, on_gpu=False))
    assert vllm == (kv_cache_bytes(kv, load.context_tokens, 8, "cpu")
                    - kv_cache_bytes(kv, bench.context_tokens + 16, 1, "cpu"))
    # llama-server: 8 slots of 512 tokens (256 × 1.5 + 64 + 64), 512 cells each, f16 KV (core.capacity's rule)
    gguf = plan_job_peak(spec, get("q4_k_m"), bench, on_gpu=False, load=load)
    assert gguf >= kv_bytes_per_token(spec, "f16") * 512 * 8


def test_the_eta_counts_the_sweep_after_the_benchmark(tmp_path: Path):
    spec = Catalog().resolve("default")
    load = LoadSweepSpec(levels=(1, 2), prompt_tokens=64, max_tokens=16, repetitions=1)
    job = JobSpec(model_ref="default", precision="q8_0", data_dir=str(tmp_path), bench=BenchConfig.quick(),
                  load=load)
    (with_load,) = estimate_jobs(spec, [job], tmp_path)
    (without,) = estimate_jobs(spec, [replace(job, load=None)], tmp_path)
    names = [p.name for p in with_load.phases]
    assert names.index(str(PhaseKind.LOAD_SWEEP)) == names.index(str(PhaseKind.BENCHMARK)) + 1
    sweep = next(p for p in with_load.phases if p.name == str(PhaseKind.LOAD_SWEEP))
    assert sweep.seconds > 0 and with_load.total_s == pytest.approx(without.total_s + sweep.seconds)
    # (1 warm-up + 1 round) × (1 + 2 streams) × (16 out + 64 in ÷ the prefill factor): every token counted
    assert load.timed_tokens(6.0) == 2 * 3 * (16 + 64 / 6.0)


def test_run_load_flags_become_the_jobs_sweep(tmp_path: Path):
    from qexplorer.cli import build_parser
    from qexplorer.cli.run import run_options
    from qexplorer.core.settings import Settings

    args = build_parser().parse_args(["run", "default", "--precision", "q8_0", "--load", "4,1,2", "--slo-itl-p99",
                                      "250", "--load-max-tokens", "32"])
    options = run_options(args, Settings())
    assert options.load is not None and options.load.levels == (1, 2, 4) and options.load.max_tokens == 32
    assert options.load.plan.objective == ServiceObjective(ttft_p99_s=2.0, itl_p99_ms=250.0)
    plan = plan_run("default", Catalog().resolve("default"), [get("q8_0")], options, simulated_sampler("none").sample(),
                    tmp_path)
    quick, full = plan.specs
    assert quick.first_pass and quick.load is None and full.load is not None and full.load.levels == (1, 2, 4)
    plain = plan_run("default", Catalog().resolve("default"), [get("q8_0")], replace(options, load=None),
                     simulated_sampler("none").sample(), tmp_path)
    assert quick.planned_peak_bytes == plain.specs[0].planned_peak_bytes < full.planned_peak_bytes
    assert main(["run", "default", "--precision", "q8_0", "--load", "1,0"]) == 2
    assert main(["run", "default", "--precision", "q8_0", "--load", "--load-repetitions", "0"]) == 2


async def test_l_on_the_plan_screen_toggles_the_load_sweep():
    app = sim_app("none")
    async with app.run_test(size=(120, 40)) as pilot:
        await feed_samples(app, pilot, 1)
        await settle(app, pilot)
        await pilot.press("p")
        await pilot.pause()
        assert app.run_options().load is None
        await pilot.press("l")
        await pilot.pause()
        load = app.run_options().load
        assert load is not None and load.levels == (1, 2, 4, 8)
        assert all((s.load is None) == s.first_pass for s in app.planned_jobs().specs)
        assert "load sweep at concurrency 1,2,4,8" in str(app.screen.query_one("#plan-summary").render())
        await pilot.press("l")
        await pilot.pause()
        assert app.run_options().load is None


@pytest.mark.e2e
def test_a_gguf_jobs_load_sweep_runs_in_llama_server(capsys, isolated_user_dirs):
    """The GGUF artifact swept in llama.cpp's own server (built by set-up from the vendored llama.cpp): one slot
    per stream, /metrics read, and the result's goodput under the objective; a second identical run reuses it,
    a different sweep is a new measurement."""
    args = ["run", "default", "--precision", "q4_k_m", "--quick", "--no-quick-pass", "--json", "--load", "1,2",
            "--load-prompt-tokens", "48", "--load-max-tokens", "8", "--load-repetitions", "1"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    (load,) = out["capacity_under_load"]
    assert load["engine"] == "llama.cpp" and [lv["concurrency"] for lv in load["levels"]] == [1, 2]
    assert all(lv["errored"] == 0 for lv in load["levels"])
    assert load["levels"][1]["server_metrics"]["engine"] == "llama-server"
    assert load["levels"][1]["server_metrics"]["running_max"] <= 2  # two slots: never more running
    assert main([*args[:-2], "--load-repetitions", "2"]) == 0  # another sweep: measured again, not reused
    again = json.loads(capsys.readouterr().out)["jobs"][0]["result"]
    assert again["reused_from"] is None


def test_a_sweep_or_task_pass_cut_short_teaches_the_eta_nothing():
    from test_job_queue import a_record

    from qexplorer.core.domain.record import ServerSweep
    from qexplorer.core.jobs.queue import cut_short

    done = ServerSweep(model_id="m", host="h", max_tokens=8, repetitions=1, token_count="",
                       levels=(None,))  # type: ignore[arg-type] - only its presence is read
    record = replace(a_record(), server=done)
    assert cut_short(record) == set()
    assert cut_short(replace(record, server=replace(done, stopped_early="saturated"))) == {"load-sweep"}
    assert cut_short(replace(record, server=None, task_error="x")) == {"load-sweep", "tasks"}
