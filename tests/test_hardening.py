"""Hardening: bad inputs, faults and safe defaults - a test each (README "Reliability")."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from apps import feed_samples, settle, sim_app
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from models import LLAMA_31_8B, write_config

from qexplorer.cli import main
from qexplorer.core.catalog import Catalog, bundled_model_path
from qexplorer.core.domain.bench import BenchConfig
from qexplorer.core.domain.events import Phase, drive
from qexplorer.core.domain.record import record_from_legacy as legacy
from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.errors import UserError
from qexplorer.core.gguf_header import read_gguf_header
from qexplorer.core.jobs.runner import JobRunner
from qexplorer.core.readers import spec_from_folder
from qexplorer.core.results import ResultsStore

QUICK = BenchConfig.quick()


# ------------------------------------------------------------------ bad inputs
def test_remote_code_checkpoint_is_refused(tmp_path: Path, capsys):
    folder = write_config(tmp_path / "custom", {**LLAMA_31_8B, "auto_map": {"AutoModel": "modeling_x.X"}})
    assert main(["run", str(folder), "--precision", "bf16", "--simulate", "none"]) == 2
    err = capsys.readouterr().err
    assert "trust_remote_code" in err and "--trust-remote-code" in err and err.count("\n") == 1


def test_pickle_only_checkpoint_is_refused(tmp_path: Path, capsys):
    folder = write_config(tmp_path / "pickled", LLAMA_31_8B)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert main(["export", str(folder), "--precision", "bf16", "--out", str(tmp_path / "o")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err


def test_model_that_does_not_fit_is_refused_unless_forced(capsys):
    assert main(["run", "default", "--precision", "fp32", "--simulate", "none", "--reserve-gib", "1000"]) == 2
    err = capsys.readouterr().err
    assert "FP32 does not fit" in err and "--force" in err


@pytest.mark.parametrize(("content", "message"), [(b"", "is empty"), ("caf\xe9".encode("latin-1"), "not UTF-8")])
def test_bad_evaluation_text(tmp_path: Path, capsys, content, message):
    corpus = tmp_path / "eval.txt"
    corpus.write_bytes(content)
    assert main(["run", "default", "--precision", "q8_0", "--quality", "--corpus", str(corpus)]) == 2
    assert message in capsys.readouterr().err


def test_locked_store_is_one_sentence(tmp_path: Path):
    store = ResultsStore.in_dir(tmp_path)
    store.add(legacy({"model_name": "m", "model_path": "p", "precision": "q8_0", "family": "gguf"}))
    holder = sqlite3.connect(store.path)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(UserError, match="locked by another process"):
            store.add(legacy({"model_name": "m", "model_path": "p", "precision": "q6_k", "family": "gguf"}))
    finally:
        holder.rollback()
        holder.close()
    assert [r.precision for r in store.all()] == ["q8_0"]


async def test_app_starts_with_a_damaged_store_and_says_so(isolated_user_dirs):
    data = isolated_user_dirs / "data"
    data.mkdir(parents=True)
    (data / "results.sqlite3").write_bytes(b"not a database" * 100)
    app = sim_app("none")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        await pilot.press("c")
        await settle(app, pilot)
        assert "damaged" in app.results_error
        assert any("damaged" in n.message for n in app._notifications)
        await pilot.press("d")
        assert type(app.screen).__name__ == "DashboardScreen"


# ------------------------------------------------------------------ faults
@pytest.mark.e2e
@pytest.mark.parametrize(("precision", "phase"), [("int4_rtn", "quantize"), ("q8_0", "benchmark")])
def test_worker_killed_mid_phase(tmp_path: Path, precision, phase):
    runner = JobRunner(interval_s=0.2)

    def kill(event):
        if isinstance(event, Phase) and event.name == phase:
            os.kill(runner.current_pid, signal.SIGKILL)

    spec = JobSpec(model_ref="default", precision=precision, data_dir=str(tmp_path), bench=QUICK)
    outcome = runner.run(spec, on_event=kill)
    assert outcome.status == "failed" and "SIGKILL" in outcome.error


@pytest.mark.e2e
def test_worker_killed_mid_export_leaves_no_file_under_the_final_name(tmp_path: Path):
    runner = JobRunner(interval_s=0.2)
    out = tmp_path / "out.gguf"

    def kill(event):
        if isinstance(event, Phase) and event.name == "export":
            os.kill(runner.current_pid, signal.SIGKILL)

    spec = JobSpec(model_ref="default", precision="q8_0", data_dir=str(tmp_path / "data"), bench=QUICK,
                   action="export", export_path=str(out))
    outcome = runner.run(spec, on_event=kill)
    assert outcome.status == "failed" and not out.exists()


def test_disk_full_during_export_leaves_no_file_under_the_final_name(tmp_path: Path, monkeypatch):
    from qexplorer.core import export
    from qexplorer.core.catalog import Catalog
    from qexplorer.core.precisions import get

    spec = Catalog().resolve("default")
    work = tmp_path / "work"
    work.mkdir()
    (work / "q8_0.gguf").write_bytes(b"GGUF")  # the artifact exists; only the copy can fail

    def full(src, dst, *args, **kwargs):
        Path(dst).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    def other_file_system(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(shutil, "copyfile", full)
    monkeypatch.setattr(os, "link", other_file_system)  # a link would not fill the disk: the copy must happen
    out = tmp_path / "model.gguf"
    with pytest.raises(UserError, match="No space left on device"):
        list(export.export_model(spec, get("q8_0"), out, work))
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


async def test_gpu_telemetry_lost_mid_run_is_shown_and_sampling_goes_on():
    app = sim_app("gb10")
    async with app.run_test(size=(100, 30)) as pilot:
        await feed_samples(app, pilot, 2)
        app.sources.sampler.host.machine.gpu_lost = True
        await feed_samples(app, pilot, 2)
        banner = str(app.screen.query_one("#banner").render())
        assert "TELEMETRY LOST" in banner
        assert app.snapshot.host.available_bytes.value is not None
        assert len(app.history) == 4


@pytest.mark.e2e
def test_ctrl_c_in_the_cli_keeps_finished_results_and_ends_the_child(isolated_user_dirs):
    env = {**os.environ}
    proc = subprocess.Popen([sys.executable, "-m", "qexplorer", "run", "default", "--precision", "q8_0,int8",
                             "--quick", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    store = ResultsStore.in_dir(isolated_user_dirs / "data")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if store.path.exists() and store.all():
            break
        time.sleep(0.2)
    import psutil

    def workers() -> list[psutil.Process]:
        found = []
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "qexplorer.worker" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.Error:
                continue
        return found

    while time.monotonic() < deadline and not workers():  # the second job's worker has started
        time.sleep(0.05)
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "finished results are saved" in err
    assert [r.precision for r in store.all()] == ["q8_0"]
    assert json.loads(out)["jobs"][0]["status"] == "ok"
    time.sleep(0.5)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


# ------------------------------------------------------------------ fuzzing
def tiny_gguf_bytes(tmp_path: Path) -> bytes:
    from gguf import GGUFWriter

    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_context_length(64)
    writer.add_feed_forward_length(16)
    writer.add_vocab_size(32)
    writer.add_token_list([f"t{i}" for i in range(32)])
    for name, shape in (("token_embd.weight", (32, 8)), ("blk.0.attn_q.weight", (8, 8)),
                        ("blk.0.attn_norm.weight", (8,)), ("output_norm.weight", (8,))):
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_tiny_gguf_reads(tmp_path: Path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(tiny_gguf_bytes(tmp_path))
    header = read_gguf_header(path)
    assert len(header.tensors) == 4 and header.metadata["llama.block_count"] == 1


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_gguf_reader(tmp_path_factory, data):
    base = _fuzz_base(tmp_path_factory)
    mode = data.draw(st.sampled_from(["flip", "truncate", "random"]))
    if mode == "flip":
        raw = bytearray(base)
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(raw)
    elif mode == "truncate":
        blob = base[: data.draw(st.integers(0, len(base)))]
    else:
        blob = b"GGUF" + data.draw(st.binary(max_size=512))
    path = tmp_path_factory.getbasetemp() / "fuzz.gguf"
    path.write_bytes(blob)
    started = time.perf_counter()
    try:
        read_gguf_header(path)
    except UserError:
        pass
    assert time.perf_counter() - started < 2.0


_BASE: list[bytes] = []


def _fuzz_base(factory) -> bytes:
    if not _BASE:
        _BASE.append(tiny_gguf_bytes(factory.mktemp("base")))
    return _BASE[0]


_BASE_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
config_keys = st.sampled_from(["architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "num_key_value_heads", "head_dim", "vocab_size", "intermediate_size",
                               "num_experts", "num_experts_per_tok", "moe_intermediate_size", "tie_word_embeddings",
                               "max_position_embeddings", "torch_dtype", "quantization_config", "auto_map"])


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=st.dictionaries(config_keys, json_values | st.just(["LlamaForCausalLM"]) | st.integers(0, 4096),
                              max_size=16))
@example(config={"architectures": ["LlamaForCausalLM"], **_BASE_SHAPE, "num_experts": ":"})
@example(config={"architectures": ["LlamaForCausalLM"], **_BASE_SHAPE, "moe_intermediate_size": [1]})
@example(config={"architectures": ["LlamaForCausalLM"], **_BASE_SHAPE, "num_experts_per_tok": [2, 3]})
@example(config={"architectures": ["LlamaForCausalLM"], **_BASE_SHAPE, "num_experts": 4, "num_experts_per_tok": {}})
def test_fuzz_config_reader(tmp_path_factory, config):
    folder = tmp_path_factory.getbasetemp() / "fuzzcfg"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    try:
        spec_from_folder(folder)
    except UserError:
        pass


BAD_MOE_FIELDS = [("num_experts", ":"), ("moe_intermediate_size", [1536]), ("num_experts_per_tok", [8]),
                  ("num_local_experts", -1), ("num_experts_per_tok", True)]


@pytest.mark.parametrize(("key", "value"), BAD_MOE_FIELDS)
def test_a_bad_config_field_is_one_sentence_and_exit_2(tmp_path: Path, capsys, key, value):
    folder = write_config(tmp_path / "bad", {**LLAMA_31_8B, key: value})
    with pytest.raises(UserError, match=f"no valid '{key}'"):
        spec_from_folder(folder)
    assert main(["plan", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and key in err and len(err.strip().splitlines()) == 1


def test_the_catalog_survives_a_bad_config_in_the_hf_cache(tmp_path: Path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--acme--bad" / "snapshots" / "abc"
    write_config(snapshot, {**LLAMA_31_8B, "num_experts": ":"})
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    entries = {e.ref: e for e in Catalog(include_app_dirs=False).scan()}
    assert entries["acme/bad"].spec is None and "num_experts" in entries["acme/bad"].error


def test_a_corrupt_tensor_shape_in_a_safetensors_header_is_one_sentence(tmp_path: Path):
    folder = write_config(tmp_path / "m", LLAMA_31_8B)
    raw = json.dumps({"w": {"dtype": "BF16", "shape": ["x", 4], "data_offsets": [0, 8]}}).encode()
    (folder / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 8)
    with pytest.raises(UserError, match="corrupt safetensors header"):
        spec_from_folder(folder)


# ------------------------------------------------------------------ safe defaults
def test_cli_puts_the_hubs_offline(monkeypatch, capsys):
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    assert main(["monitor", "--once", "--json", "--simulate", "none"]) == 0
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_no_shell_strings_anywhere():
    root = Path(__file__).resolve().parents[1] / "qexplorer"
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "shell=True" not in text and "os.system(" not in text, path


@pytest.mark.e2e
def test_worker_files_are_user_only(tmp_path: Path):
    outcome = JobRunner(interval_s=0.2).run(
        JobSpec(model_ref="default", precision="q8_0", data_dir=str(tmp_path), bench=QUICK))
    assert outcome.ok
    for path in [outcome.log_path, Path(outcome.record.engine.artifact_path)]:
        assert path.stat().st_mode & 0o077 == 0, path
    assert bundled_model_path() is not None


@pytest.mark.e2e
def test_a_damaged_store_costs_the_reuse_lookup_not_the_job(tmp_path: Path):
    """J2, with the real worker: the reuse lookup is the parent's; before, the worker opened the store and a
    damaged one failed the job after it had quantized."""
    (tmp_path / "results.sqlite3").write_bytes(b"this is not a database" * 100)
    warnings: list[str] = []
    outcome = JobRunner(interval_s=0.2).run(
        JobSpec(model_ref="default", precision="q8_0", data_dir=str(tmp_path), bench=QUICK),
        on_event=lambda e: warnings.append(e.message) if getattr(e, "level", "") == "warning" else None)
    assert outcome.ok, outcome.error
    assert outcome.record is not None and outcome.record.speed is not None
    assert any("no earlier measurement could be looked up" in w for w in warnings)



def test_an_export_on_the_artifacts_file_system_is_a_hard_link(tmp_path: Path):
    """Issue 26 item 2: a full copy of a 60 GB folder where a link does: same inode, no second copy on disk."""
    from qexplorer.core import export
    from qexplorer.core.catalog import Catalog
    from qexplorer.core.precisions import get

    spec = Catalog().resolve("default")
    work = tmp_path / "work"
    work.mkdir()
    (work / "q8_0.gguf").write_bytes(b"GGUF")
    out = tmp_path / "model.gguf"
    record = drive(export.export_model(spec, get("q8_0"), out, work))
    assert out.stat().st_ino == (work / "q8_0.gguf").stat().st_ino and record.bytes == 4
