"""A measurement is shown again only when nothing it depends on changed (core.reuse)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from test_job_queue import a_record

from qexplorer.core.domain.bench import BenchConfig
from qexplorer.core.domain.record import Noise
from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.results import ResultsStore
from qexplorer.core.reuse import find_reusable, quiet, reuse_key, reused

VERSIONS = {"qexplorer": "0.1.0", "llama_cpp_python": "0.3.36"}


def key(job: JobSpec, sha: str = "a" * 64, **changes) -> str:
    facts = {"versions": VERSIONS, "engine_version": None, "cpu": "AMD EPYC", "gpu": None, **changes}
    return reuse_key(job, sha, facts["versions"], facts["engine_version"], facts["cpu"], facts["gpu"])


def test_the_key_follows_everything_a_figure_depends_on():
    job = JobSpec(model_ref="default", precision="q8_0", data_dir="/d", bench=BenchConfig.quick(), quality=True)
    same = key(job)
    assert key(replace(job, data_dir="/elsewhere", shown_profile="gb10")) == same  # not what was measured
    different = [
        key(job, sha="b" * 64),  # another artifact
        key(job, versions={**VERSIONS, "llama_cpp_python": "0.3.37"}),  # another engine build
        key(job, engine_version="vllm 0.33.0"),
        key(job, cpu="Intel Xeon"), key(job, gpu="NVIDIA GB10"),
        key(replace(job, bench=BenchConfig())), key(replace(job, bench=replace(BenchConfig.quick(), depths=(0, 512)))),
        key(replace(job, quality=False)), key(replace(job, quality_tokens=8192)),
        key(replace(job, engine_args=("--max-num-seqs", "4"))), key(replace(job, precision="q4_k_m")),
    ]
    assert same not in different and len(set(different)) == len(different)


def test_only_a_quiet_result_with_the_same_key_is_reused(tmp_path: Path):
    store = ResultsStore.in_dir(tmp_path)
    record = replace(a_record("q8_0"), reuse_key="k1")
    assert quiet(record)
    busy = replace(record.speed, noise=Noise(other_cpu_pct=30.0, cv_pct=1.0, noisy=True, reason="busy"))
    store.add(replace(record, speed=busy))
    assert find_reusable(store, record.model.path, "q8_0", "k1") is None  # timed while others were busy: again
    store.add(replace(record, shared_phases=("benchmark",)))
    assert find_reusable(store, record.model.path, "q8_0", "k1") is None  # never timed beside other work
    spread = replace(record.speed, noise=Noise(other_cpu_pct=1.5, cv_pct=8.6, noisy=True, reason="spread"))
    assert quiet(replace(record, speed=spread))  # this machine's own spread would come back: shown, flagged
    good = store.add(record)
    store.add(replace(record, reuse_key="k2"))
    found = find_reusable(store, record.model.path, "q8_0", "k1")
    assert found is not None and found.id == good
    assert find_reusable(store, record.model.path, "q4_k_m", "k1") is None
    assert find_reusable(store, "/another/model.gguf", "q8_0", "k1") is None
    again = reused(found)
    assert again.reused_from == good and again.reused_measured_at and again.speed == record.speed


def test_an_artifacts_sha256_is_hashed_once_and_again_when_its_files_change(tmp_path, monkeypatch):
    """Issue 26 item 2: every job hashed the whole artifact (minutes on a 60 GB folder). The hash is kept beside
    it, keyed by the files' names, sizes and modification times."""
    import os

    from qexplorer.core import artifacts

    folder = tmp_path / "fp8-compressed-tensors"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"a" * 1000)
    (folder / "config.json").write_text("{}")
    first = artifacts.artifact_sha256(folder)
    assert first == artifacts.content_sha256(folder) and (tmp_path / "fp8-compressed-tensors.sha256.json").exists()
    real = artifacts.content_sha256
    monkeypatch.setattr(artifacts, "content_sha256", lambda path: (_ for _ in ()).throw(AssertionError("rehashed")))
    assert artifacts.artifact_sha256(folder) == first  # from the sidecar, without reading the weights
    monkeypatch.setattr(artifacts, "content_sha256", real)
    (folder / "model.safetensors").write_bytes(b"b" * 1000)  # same size: the modification time tells
    os.utime(folder / "model.safetensors", ns=(1, 1))
    assert artifacts.artifact_sha256(folder) == real(folder) != first
    user = tmp_path / "users-model"
    user.mkdir()
    (user / "w.safetensors").write_bytes(b"c")
    work = tmp_path / "work"
    work.mkdir()
    assert artifacts.artifact_sha256(user, work) == real(user)
    assert not (tmp_path / "users-model.sha256.json").exists()  # never writes beside a folder that is not ours
    monkeypatch.setattr(artifacts, "content_sha256", lambda path: (_ for _ in ()).throw(AssertionError("rehashed")))
    assert artifacts.artifact_sha256(user, work) == real(user)  # its sidecar in the work dir: hashed once too


def test_a_result_whose_task_pass_or_load_sweep_failed_is_measured_again(tmp_path: Path):
    from qexplorer.core.domain.record import ServerSweep

    store = ResultsStore.in_dir(tmp_path)
    record = replace(a_record("q8_0"), reuse_key="k1")
    store.add(replace(record, task_error="RuntimeError: the server went away"))
    assert find_reusable(store, record.model.path, "q8_0", "k1") is None
    store.add(record)  # no sweep: fine for a job without one, measured again for a job that asks for one
    assert find_reusable(store, record.model.path, "q8_0", "k1") is not None
    assert find_reusable(store, record.model.path, "q8_0", "k1", wants_load=True) is None
    failed = ServerSweep(model_id="m", host="h", max_tokens=8, repetitions=1, token_count="", error="refused")
    store.add(replace(record, server=failed))
    assert find_reusable(store, record.model.path, "q8_0", "k1", wants_load=True) is None
