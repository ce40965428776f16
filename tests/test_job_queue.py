"""The typed job path: events and records across the process boundary, the headless queue, old stores."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from qexplorer.core.domain.bench import BenchConfig, Stat
from qexplorer.core.domain.events import Completed, Failed, Log, Metric, Phase, Progress, event_from_line, event_to_line
from qexplorer.core.domain.record import (
    EngineInfo,
    ExportRecord,
    ModelIdentity,
    QualityStats,
    ReferenceInfo,
    RunRecord,
    Speed,
)
from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.jobs.queue import JobQueue, JobView
from qexplorer.core.jobs.runner import JobOutcome
from qexplorer.core.jobs.watch import MemorySample
from qexplorer.core.kinds import Engine, Family, JobStatus, SupportMode
from qexplorer.core.results import ResultsStore, flat_row


def a_record(precision: str = "q8_0", decode: float = 150.0) -> RunRecord:
    quality = QualityStats(n_positions=100, ppl=11.5, ppl_ref=11.4, ln_ppl_ratio=0.01, ln_ppl_ratio_se=0.001,
                           kld_mean=0.0047, kld_sd=0.01, kld_se=0.001, kld_median=0.002, kld_p90=0.01,
                           kld_p95=0.02, kld_p99=0.05, kld_p999=0.1, kld_max=0.2, same_top1_pct=95.1,
                           same_top1_se_pct=0.4, delta_p_mean_pct=-0.1, delta_p_rms_pct=2.0,
                           reference=ReferenceInfo("bf16", True, "prose", "abc", 4096, 512, 8, 256, "8 × 512"))
    return RunRecord(
        model=ModelIdentity("SmolLM2", "/m.gguf", "default", 134_515_008, "Q4_1", True),
        precision=precision, precision_label=precision.upper(), family=Family.GGUF,
        engine=EngineInfo(Engine.LLAMA_CPP, SupportMode.NATIVE, "cpu", "/a/q8_0.gguf", 143_000_000),
        versions={"qexplorer": "0.1.0"}, bench=BenchConfig.quick(),
        speed=Speed(Stat(900.0, 12.0, 2), Stat(decode, 2.0, 2), Stat(0.08, 0.001, 2), 64, 16, 2, 2),
        roofline_pct=40.0, quality=quality,
    ).with_memory(peak_rss_bytes=250_000_000, weight_bytes=143_000_000)


# ------------------------------------------------------------------ wire and records
def test_every_event_crosses_the_wire_unchanged():
    events = [Phase("load", "loading x"), Progress("benchmark", 1, 2, "repetition 1"), Log("careful", "warning"),
              Metric("decode_tok_s", 141.7, "tok/s", 3.9), Failed("it broke"), Completed(a_record()),
              Completed(ExportRecord("/out.gguf", "gguf", 10, "llama-server -m /out.gguf"))]
    for event in events:
        assert event_from_line(event_to_line(event)) == event


@pytest.mark.parametrize("line", ["not json", "[1, 2]", '{"no": "type"}', '{"type": "phase"}',
                                  '{"type": "completed", "record": 3}', '{"type": "progress", "phase": "x", '
                                  '"done": "one", "total": 2}'])
def test_stray_lines_are_not_events(line):
    with pytest.raises(ValueError):
        event_from_line(line)


def test_run_record_round_trips_and_ignores_unknown_fields():
    record = a_record()
    data = json.loads(record.dumps())
    assert data["version"] == 2 and data["speed"]["decode_tok_s"] == {"mean": 150.0, "sd": 2.0, "n": 2}
    assert RunRecord.from_json(data) == record
    data["a_field_from_a_newer_qexplorer"] = 1
    data["speed"]["another"] = {"x": 1}
    assert RunRecord.from_json(data) == record


def test_job_spec_round_trips():
    spec = JobSpec(model_ref="default", precision="q8_0", data_dir="/d", bench=BenchConfig.quick(),
                   model_paths=("/a", "/b"), quality=True)
    assert JobSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_a_schema_1_store_opens_and_is_migrated(tmp_path: Path):
    """A store written by qexplorer 0.1 (flat dictionaries) opens, reads by attribute, and is rewritten once."""
    path = tmp_path / "results.sqlite3"
    legacy = {"model_name": "SmolLM2", "model_path": "/m.gguf", "precision": "q8_0", "precision_label": "GGUF Q8_0",
              "family": "gguf", "backend": "llama.cpp", "mode": "native", "weight_bytes": 143_000_000,
              "peak_rss_bytes": 250_000_000, "reference_quantized": True,
              "decode_tok_s": {"mean": 150.0, "sd": 2.0, "n": 5}, "prefill_tok_s": {"mean": 900.0, "sd": 9.0, "n": 5},
              "ttft_s": {"mean": 0.08, "sd": 0.0, "n": 5}, "prompt_tokens": 512, "gen_tokens": 128,
              "repetitions": 5, "threads": 2, "roofline_pct": 40.0,
              "hardware": {"cpu": "EPYC", "cores": 2, "gpu": None, "bandwidth_bytes_s": 2e10},
              "quality": {"kld_mean": 0.0047, "same_top1_pct": 95.1, "ppl": 11.5, "ppl_ref": 11.4,
                          "n_positions": 2805, "corpus": "prose", "ctx": 512}}
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "CREATE TABLE results (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at REAL NOT NULL, model_name TEXT"
            " NOT NULL, model_path TEXT NOT NULL, precision TEXT NOT NULL, family TEXT NOT NULL, backend TEXT,"
            " status TEXT NOT NULL, error TEXT, record TEXT NOT NULL); PRAGMA user_version = 1;")
        conn.execute("INSERT INTO results (created_at, model_name, model_path, precision, family, backend, status,"
                     " error, record) VALUES (1, 'SmolLM2', '/m.gguf', 'q8_0', 'gguf', 'llama.cpp', 'ok', NULL, ?)",
                     (json.dumps(legacy),))
    [row] = ResultsStore(path).all()
    record = row.record
    assert record.speed.decode_tok_s == Stat(150.0, 2.0, 5) and record.engine.name == Engine.LLAMA_CPP
    assert record.quality.kld_mean == 0.0047 and record.quality.reference.corpus == "prose"
    assert record.model.stored_quantized and record.memory.peak_rss_bytes == 250_000_000
    assert flat_row(row)["tg_avg_ts"] == 150.0
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        stored = json.loads(conn.execute("SELECT record FROM results").fetchone()[0])
    assert stored["version"] == 2  # rewritten in place, once


# ------------------------------------------------------------------ the queue
class FakeRunner:
    """Stands in for JobRunner: each job emits a phase and finishes ok after ``hold_s``."""

    def __init__(self, hold_s: float = 0.0) -> None:
        self.hold_s = hold_s
        self.ran: list[str] = []

    def run(self, job, on_event=None, cancel=None, on_memory=None) -> JobOutcome:
        self.ran.append(job.precision)
        if on_event:
            on_event(Phase("benchmark", "pp64"))
        if on_memory:
            on_memory(MemorySample(0.0, 100, None, 10**9, "benchmark"))
        deadline = time.monotonic() + self.hold_s
        while time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                return JobOutcome(job=job, status=JobStatus.CANCELLED, error="Cancelled by the user.")
            time.sleep(0.01)
        return JobOutcome(job=job, status=JobStatus.OK, error=None, record=a_record(job.precision),
                          peak_rss_bytes=100)


def spec(precision: str) -> JobSpec:
    return JobSpec(model_ref="default", precision=precision, data_dir="/nonexistent", model_name="SmolLM2",
                   model_path="/m.gguf")


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_job_queued_as_the_last_one_finishes_still_runs(tmp_path: Path):
    """The old app queue cleared its 'running' flag after its last look at the queue, outside any lock: a job
    submitted in between stayed queued forever. Here, 100 times, a job is submitted from a second thread the
    moment the consumer publishes that the previous (last) job finished - right at that window - and another
    from the consumer's own notification. Every one must run, with one consumer at a time."""
    runner = FakeRunner()
    consumers: list[threading.Thread] = []
    active = threading.Semaphore(1)

    def start_consumer() -> None:
        def consume() -> None:
            assert active.acquire(blocking=False), "two consumers at once"
            try:
                queue.drain()
            finally:
                active.release()
        thread = threading.Thread(target=consume)
        consumers.append(thread)
        thread.start()

    def on_change(view: JobView) -> None:
        if view.finished and view.id % 2 == 1 and view.id < 200:
            threading.Thread(target=queue.submit, args=([spec(f"p{view.id + 1}")],)).start()
            queue.submit([spec(f"p{view.id + 2}")])  # on the consumer's own thread

    queue = JobQueue(runner, None, on_change=on_change, start_consumer=start_consumer)
    queue.submit([spec("p1")])
    wait_for(lambda: len(queue.views()) >= 201 and all(v.finished for v in queue.views()), timeout_s=60)
    for thread in list(consumers):
        thread.join(timeout=5)
    assert all(v.status == JobStatus.OK for v in queue.views())
    assert len(runner.ran) == len(queue.views())


def test_finished_jobs_are_stored_in_order(tmp_path: Path):
    store = ResultsStore.in_dir(tmp_path)
    queue = JobQueue(FakeRunner(), store)
    queue.submit([spec("q8_0"), spec("q6_k"), spec("q4_k_m")])
    queue.drain()
    assert [r.precision for r in store.by_ids([v.stored_id for v in queue.views()])] == ["q8_0", "q6_k", "q4_k_m"]


def test_drain_runs_jobs_submitted_while_draining(tmp_path: Path):
    runner = FakeRunner()

    def on_change(view: JobView) -> None:
        if view.id == 1 and view.status == JobStatus.RUNNING and len(queue.views()) == 1:
            queue.submit([spec("q6_k")])

    queue = JobQueue(runner, ResultsStore.in_dir(tmp_path), on_change=on_change)
    queue.submit([spec("q8_0")])
    queue.drain()
    assert runner.ran == ["q8_0", "q6_k"]


def test_views_are_frozen_and_carry_revisions(tmp_path: Path):
    seen: list[JobView] = []
    queue = JobQueue(FakeRunner(), ResultsStore.in_dir(tmp_path), on_change=seen.append)
    queue.submit([spec("q8_0")])
    queue.drain()
    assert [v.revision for v in seen] == sorted(v.revision for v in seen)
    assert [v.status for v in seen][0] == JobStatus.QUEUED and seen[-1].status == JobStatus.OK
    assert seen[-1].record.speed.decode_tok_s.mean == 150.0 and seen[-1].memory
    with pytest.raises(AttributeError):
        seen[-1].status = JobStatus.FAILED  # type: ignore[misc]


def test_cancel_a_queued_and_a_running_job(tmp_path: Path):
    runner = FakeRunner(hold_s=5.0)
    queue = JobQueue(runner, ResultsStore.in_dir(tmp_path))
    first, second = queue.submit([spec("q8_0"), spec("q6_k")])
    worker = threading.Thread(target=queue.drain)
    worker.start()
    wait_for(lambda: queue.view(first).status == JobStatus.RUNNING)
    queue.cancel(second)
    assert queue.view(second).status == JobStatus.CANCELLED
    queue.cancel(first)
    worker.join(timeout=5)
    assert queue.view(first).status == JobStatus.CANCELLED and runner.ran == ["q8_0"]


def test_store_failure_is_reported_and_the_queue_goes_on(tmp_path: Path):
    store = ResultsStore.in_dir(tmp_path)
    store.path.write_bytes(b"not a database" * 100)
    queue = JobQueue(FakeRunner(), store)
    queue.submit([spec("q8_0"), spec("q6_k")])
    queue.drain()
    views = queue.views()
    assert all(v.status == JobStatus.OK and "damaged" in (v.store_error or "") for v in views)
