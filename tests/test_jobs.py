"""Jobs in child processes: end to end on the bundled model, faults, the memory guard, the store."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest

from qexplorer.cli import main
from qexplorer.core.domain.bench import BenchConfig
from qexplorer.core.domain.events import Phase
from qexplorer.core.domain.record import RunRecord
from qexplorer.core.domain.record import record_from_legacy as legacy
from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.jobs.queue import store_outcome
from qexplorer.core.jobs.runner import JobRunner
from qexplorer.core.results import ResultsStore, to_markdown
from qexplorer.core.reuse import quiet
from qexplorer.core.simulate import simulated_sampler
from qexplorer.core.units import GIB

QUICK = BenchConfig.quick()


def job(tmp_path: Path, precision: str, **kwargs) -> JobSpec:
    return JobSpec(model_ref="default", precision=precision, data_dir=str(tmp_path / "data"), bench=QUICK, **kwargs)


@pytest.mark.e2e
def test_cli_run_q8_0_and_int8_quick_json(capsys, isolated_user_dirs):
    code = main(["run", "default", "--precision", "q8_0,int8", "--quick", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    assert [j["status"] for j in data["jobs"]] == ["ok", "ok"]
    by = {r["precision"]: r for r in data["results"]}
    for key, backend in (("q8_0", "llama.cpp"), ("int8", "vllm")):
        row = by[key]
        assert row["backend"] == backend
        assert row["tg_avg_ts"] > 0 and row["pp_avg_ts"] > 0 and row["ttft_avg_s"] > 0
        assert row["peak_rss_bytes"] > row["model_size"] > 0
        assert row["roofline_pct"] > 0
        assert row["n_gen"] == QUICK.gen_tokens and row["repetitions"] == QUICK.repetitions
    assert "re-quantizing an already quantized file" in captured.err  # the visible warning
    store = ResultsStore.in_dir(isolated_user_dirs / "data")
    assert {r.precision for r in store.all()} == {"q8_0", "int8"}
    assert main(["results", "--format", "md"]) == 0
    assert "| GGUF Q8_0 (llama.cpp) |" in capsys.readouterr().out
    # the two jobs overlapped where they could; neither benchmark ran beside the other job's work
    first = {j["precision"]: j for j in data["jobs"]}
    assert all("benchmark" not in j["result"]["shared_phases"] for j in data["jobs"])
    # the same run again: nothing it depends on changed, so each quiet result is shown again, not re-measured
    assert main(["run", "default", "--precision", "q8_0,int8", "--quick", "--json"]) == 0
    captured = capsys.readouterr()
    for again in json.loads(captured.out)["jobs"]:
        earlier = first[again["precision"]]
        if quiet(RunRecord.from_json(earlier["result"])):
            assert again["result"]["reused_from"] == earlier["stored_id"] == again["stored_id"]
            assert again["result"]["speed"] == earlier["result"]["speed"]
            assert f"reused result #{earlier['stored_id']}" in captured.err
        else:  # timed while other processes were busy: timed again
            assert again["result"]["reused_from"] is None and again["stored_id"] != earlier["stored_id"]
    assert main(["run", "default", "--precision", "q8_0", "--quick", "--json", "--remeasure"]) == 0
    fresh = json.loads(capsys.readouterr().out)["jobs"][0]
    assert fresh["result"]["reused_from"] is None and fresh["stored_id"] not in {j["stored_id"] for j in first.values()}


@pytest.mark.e2e
def test_cli_run_at_two_depths_reports_both(capsys, isolated_user_dirs):
    code = main(["run", "default", "--precision", "q4_k_m", "--depth", "0,512", "--quick", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)["jobs"][0]["result"]
    shallow, deep = result["speed"], result["depth_speeds"][0]
    assert (shallow["depth"], deep["depth"]) == (0, 512)
    assert shallow["decode_tok_s"]["mean"] > 0 and deep["decode_tok_s"]["mean"] > 0
    assert deep["noise"]["other_cpu_pct"] >= 0 and shallow["threads"] == deep["threads"] > 0
    row = json.loads(captured.out)["results"][0]
    assert row["n_depth"] == 0 and json.loads(row["depths"])[0]["n_depth"] == 512
    # each depth has its own roofline (review A12), against its own KV term: it reads more per token than depth 0
    assert json.loads(row["depths"])[0]["roofline_pct"] == result["depth_rooflines"][0] > 0
    assert main(["run", "default", "--precision", "q4_k_m", "--depth", "0,lots"]) == 2
    assert "--depth '0,lots' is not a list of token counts" in capsys.readouterr().err


def test_sigkill_mid_run_marks_failed_and_keeps_the_store(tmp_path: Path):
    store = ResultsStore.in_dir(tmp_path / "data")
    earlier = store.add(legacy({"model_name": "m", "model_path": "p", "precision": "bf16", "family": "torch"}))
    runner = JobRunner(interval_s=0.2)

    def kill_on_load(event):
        if isinstance(event, Phase) and event.name == "load":
            os.kill(runner.current_pid, signal.SIGKILL)

    outcome = runner.run(job(tmp_path, "q8_0"), on_event=kill_on_load)
    assert outcome.status == "failed"
    assert "SIGKILL" in outcome.error and outcome.exit_code == -signal.SIGKILL
    store_outcome(store, outcome)
    assert store.integrity_ok()
    rows = store.all(include_failed=True)
    assert rows[0].id == earlier and rows[-1].status == "failed" and "SIGKILL" in rows[-1].error
    assert [r.precision for r in store.all()] == ["bf16"]  # failed rows stay out of the results


@pytest.mark.timing
def test_guard_stops_a_real_child_within_one_sample_period(tmp_path: Path):
    sampler = simulated_sampler("gb10", reserve_bytes=8 * GIB)
    machine = sampler.host.machine
    runner = JobRunner(sampler=sampler, interval_s=0.25)
    # a real child that would run for a minute
    runner.worker_command = [sys.executable, "-c", "import time; time.sleep(60)"]
    dropped_at: list[float] = []

    def squeeze() -> None:
        time.sleep(0.6)
        machine.extra_used_bytes = machine.mem_available_bytes() - 2 * GIB  # MemAvailable 2 GiB < 8 GiB reserve
        dropped_at.append(time.monotonic())

    threading.Thread(target=squeeze, daemon=True).start()
    outcome = runner.run(job(tmp_path, "q8_0", planned_peak_bytes=300 * 1024**2))
    stopped_after = time.monotonic() - dropped_at[0]
    assert outcome.status == "stopped"
    assert "headroom fell to" in outcome.error and "the plan predicted a peak of 0.3 GiB" in outcome.error
    assert stopped_after < 1.5  # within a few 0.25 s sample periods (the child would sleep 60 s), wide for a busy box
    assert runner.current_pid is None and not sampler.own_pids


def test_hanging_worker_is_ended_by_the_phase_timeout(tmp_path: Path):
    runner = JobRunner(interval_s=0.1, worker_command=[sys.executable, "-c", "import time; time.sleep(60)"])
    started = time.monotonic()
    outcome = runner.run(job(tmp_path, "q8_0", phase_timeout_s=0.5))
    assert outcome.status == "timeout" and "start phase made no progress for 0.5 s" in outcome.error
    assert time.monotonic() - started < 5


def test_cancel_terminates_the_child(tmp_path: Path):
    cancel = threading.Event()
    runner = JobRunner(interval_s=0.1, worker_command=[sys.executable, "-c", "import time; time.sleep(60)"])
    threading.Timer(0.3, cancel.set).start()
    outcome = runner.run(job(tmp_path, "q8_0"), cancel=cancel)
    assert outcome.status == "cancelled" and outcome.error == "Cancelled by the user."


def test_crashing_worker_reports_its_exit(tmp_path: Path):
    runner = JobRunner(interval_s=0.1, worker_command=[sys.executable, "-c", "raise SystemExit(7)"])
    outcome = runner.run(job(tmp_path, "q8_0"))
    assert outcome.status == "failed" and "exited with code 7" in outcome.error


def test_worker_reports_bad_input_in_one_sentence(tmp_path: Path):
    outcome = JobRunner(interval_s=0.1).run(
        JobSpec(model_ref=str(tmp_path / "missing.gguf"), precision="q8_0", data_dir=str(tmp_path), bench=QUICK))
    assert outcome.status == "failed" and outcome.error.endswith("does not exist.")


def test_store_schema_version_and_damage(tmp_path: Path):
    store = ResultsStore.in_dir(tmp_path)
    store.add(legacy({"model_name": "m", "model_path": "p", "precision": "q8_0", "family": "gguf",
               "decode_tok_s": {"mean": 10.0, "sd": 1.0, "n": 2}, "weight_bytes": 100}))
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert (store.path.stat().st_mode & 0o777) == 0o600
    assert "| q8_0 | 100 B weights" in to_markdown(store.all())
    store.path.write_bytes(b"this is not a database" * 100)
    from qexplorer.core.errors import UserError

    with pytest.raises(UserError, match="damaged"):
        store.all()


@pytest.mark.e2e
def test_cli_json_after_a_failed_job_reports_only_this_runs_rows(capsys, isolated_user_dirs):
    """int8 fails (its cached BF16 checkpoint is damaged; q8_0 does not use it): the JSON holds exactly this
    run's rows - not the older result already in the store - the failure with its reason, and exit code 1."""
    from qexplorer.core.artifacts import model_work_dir
    from qexplorer.core.catalog import Catalog

    data = isolated_user_dirs / "data"
    store = ResultsStore.in_dir(data)
    older = store.add(legacy({"model_name": "SmolLM2", "model_path": str(Catalog().resolve("default").path),
                              "precision": "q4_k_m", "family": "gguf",
                              "decode_tok_s": {"mean": 99.0, "sd": 1.0, "n": 2}}))
    damaged = model_work_dir(data, Catalog().resolve("default")) / "bf16-checkpoint"
    damaged.mkdir(parents=True)
    (damaged / "config.json").write_text("{ not json", encoding="utf-8")
    (damaged / "model.safetensors").write_bytes(b"\0" * 64)
    code = main(["run", "default", "--precision", "q8_0,int8", "--quick", "--json"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    out = json.loads(captured.out)
    assert [(j["precision"], j["status"]) for j in out["jobs"]] == [("q8_0", "ok"), ("int8", "failed")]
    assert out["jobs"][1]["error"] and out["jobs"][1]["result"] is None
    assert [r["precision"] for r in out["results"]] == ["q8_0"]
    assert older not in [r["id"] for r in out["results"]]
    assert "int8 failed:" in captured.err


def test_a_workers_peak_is_its_own_not_its_parents():
    """Linux keeps ru_maxrss across fork and exec: a worker started by a parent that once held 400 MiB reported
    400 MiB as its own peak. The worker reads its own high-water mark (VmHWM) instead."""
    import subprocess

    parent = ("import subprocess, sys; block = bytearray(400 * 2**20); block[::4096] = b'x' * len(block[::4096]); "
              "del block; print(subprocess.run([sys.executable, '-c', 'import resource; "
              "from qexplorer.core.engines.base import peak_rss_bytes; "
              "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)'], "
              "capture_output=True, text=True).stdout)")
    own, inherited = map(int, subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True,
                                             check=True).stdout.split())
    assert inherited >= 400 * 2**20  # the kernel's figure carries the parent's peak
    assert own < 200 * 2**20  # ours does not
