"""Catalog: finding models and reading their shape; bad inputs are one sentence."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from models import LLAMA_31_8B, QWEN3_CODER_30B_A3B, write_config

from qexplorer.cli import main
from qexplorer.core.catalog import Catalog, bundled_model_path
from qexplorer.core.errors import ModelReadError, UserError
from qexplorer.core.readers import spec_from_path


def test_bundled_model_spec():
    spec = Catalog().resolve("default")
    assert spec.format == "gguf" and spec.architecture == "LlamaForCausalLM"
    assert spec.total_params == 134_515_008  # measured (FACTS §2)
    assert (spec.hidden_size, spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim) == (576, 30, 9, 3, 64)
    assert spec.vocab_size == 49_152 and spec.tied_embeddings and spec.max_context == 8192
    assert spec.stored_dtype == "Q4_1" and spec.stored_quantized
    assert spec.size_on_disk_bytes == bundled_model_path().stat().st_size


def test_qwen3_moe_fixture_params(tmp_path: Path):
    spec = spec_from_path(write_config(tmp_path / "qwen3", QWEN3_CODER_30B_A3B))
    assert spec.params_source == "config shape" and spec.is_moe
    assert 30.0e9 < spec.total_params < 31.0e9  # ≈ 30.5 B
    assert 3.2e9 < spec.active_params < 3.4e9  # ≈ 3.3 B active


def test_llama_fixture_params(tmp_path: Path):
    spec = spec_from_path(write_config(tmp_path / "llama", LLAMA_31_8B))
    assert spec.head_dim == 128
    assert abs(spec.total_params - 8.03e9) < 0.01e9


def test_safetensors_headers_are_counted(tmp_path: Path):
    folder = write_config(tmp_path / "tiny", {**LLAMA_31_8B, "hidden_size": 8, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "num_key_value_heads": 1,
                                               "intermediate_size": 16, "vocab_size": 32})
    tensors = {"model.embed_tokens.weight": [32, 8], "model.layers.0.self_attn.q_proj.weight": [8, 8],
               "model.norm.weight": [8], "lm_head.weight": [32, 8]}
    header, offset = {}, 0
    for name, shape in tensors.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    spec = spec_from_path(folder)
    assert spec.params_source == "tensor headers" and spec.weights_format == "safetensors"
    assert spec.total_params == 32 * 8 + 64 + 8 + 32 * 8
    # truncated: the header promises more data than the file holds
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * (offset - 10))
    with pytest.raises(ModelReadError, match="truncated"):
        spec_from_path(folder)


def test_hf_cache_is_scanned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "abc123"
    write_config(snapshot, LLAMA_31_8B)
    refs = tmp_path / "hub" / "models--acme--tiny-llama" / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    entries = Catalog(include_app_dirs=False).scan()
    assert [e.ref for e in entries][:2] == ["default", "acme/tiny-llama"]
    assert Catalog().resolve("acme/tiny-llama").source == "hf-cache"


def test_lm_studio_and_ollama_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bundled = bundled_model_path()
    lms = tmp_path / "lmstudio" / "pub" / "model"
    lms.mkdir(parents=True)
    (lms / "m.gguf").symlink_to(bundled)
    ollama = tmp_path / "ollama"
    (ollama / "blobs").mkdir(parents=True)
    (ollama / "blobs" / "sha256-abc").write_bytes(bundled.read_bytes()[:4096])  # a broken blob
    manifest = ollama / "manifests" / "registry.ollama.ai" / "library" / "smol" / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                                "digest": "sha256:abc"}]}))
    monkeypatch.setenv("QEXPLORER_LMSTUDIO_DIR", str(tmp_path / "lmstudio"))
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "nohub"))
    entries = Catalog().scan()
    sources = [e.source for e in entries]
    # the symlink resolves to the bundled file, listed once
    assert sources.count("bundled") == 1 and "lm-studio" not in sources
    ollama_entry = next(e for e in entries if e.source == "ollama")
    assert ollama_entry.spec is None and "truncated" in ollama_entry.error  # listed, with its error


@pytest.fixture
def bad_inputs(tmp_path: Path) -> dict[str, Path]:
    bundled = bundled_model_path()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(bundled.read_bytes()[: 2 * 1024 * 1024])
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello, this is not a model\n" * 10)
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    no_arch = write_config(tmp_path / "no_arch", {"hidden_size": 8})
    unknown = write_config(tmp_path / "unknown_arch", {**LLAMA_31_8B, "architectures": ["FooForCausalLM"]})
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    (empty / "README.md").write_text("nothing here")
    return {"truncated": truncated, "not_gguf": not_gguf, "bad_json": bad_json, "no_arch": no_arch,
            "unknown_arch": unknown, "not_a_model": empty, "missing": tmp_path / "missing.gguf"}


EXPECTED = {
    "truncated": "is truncated",
    "not_gguf": "is not a GGUF file",
    "bad_json": "is not valid JSON",
    "no_arch": "names no architecture",
    "unknown_arch": "FooForCausalLM",
    "not_a_model": "is not a model folder",
    "missing": "does not exist",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_inputs_one_sentence_exit_2(bad_inputs, case, capsys):
    with pytest.raises(UserError, match=EXPECTED[case]):
        spec_from_path(bad_inputs[case])
    assert main(["plan", str(bad_inputs[case]), "--simulate", "none"]) == 2
    err = capsys.readouterr().err
    assert EXPECTED[case] in err and err.count("\n") == 1 and "Traceback" not in err


def test_unreadable_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    target = tmp_path / "secret.gguf"
    shutil.copy(bundled_model_path(), target)
    os.chmod(target, 0)
    if os.geteuid() == 0:  # root reads anything: make the permission check fail as it would for a user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == target else real_access(p, mode))
    with pytest.raises(ModelReadError, match="permission denied"):
        spec_from_path(target)
    assert main(["plan", str(target), "--simulate", "none"]) == 2
    assert "permission denied" in capsys.readouterr().err


def test_unknown_reference(capsys):
    assert main(["plan", "nobody/nothing", "--simulate", "none"]) == 2
    assert "No model called 'nobody/nothing'" in capsys.readouterr().err


def test_models_json_lists_bundled(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "nohub"))
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    default = data["models"][0]
    assert default["ref"] == "default" and default["source"] == "bundled"
    assert default["model"]["total_params"] == 134_515_008


def test_cli_and_app_share_one_artifact_folder_for_the_bundled_model():
    """The CLI resolves 'default', the app passes the file's path: both must land in the same cache folder."""
    from qexplorer.core.artifacts import model_key

    path = bundled_model_path()
    by_alias = Catalog().resolve("default")
    by_path = Catalog().resolve(str(path))
    assert by_alias.name != by_path.name  # the display names differ ...
    assert model_key(by_alias) == model_key(by_path) == model_key(spec_from_path(path))  # ... the folder does not
    assert model_key(by_alias).startswith(path.stem)


def test_file_lock_serialises_builders(tmp_path):
    import threading
    import time

    from qexplorer.core.artifacts import file_lock

    order: list[str] = []

    def builder(name: str) -> None:
        with file_lock(tmp_path / "x.lock"):
            order.append(f"{name} in")
            time.sleep(0.1)
            order.append(f"{name} out")

    threads = [threading.Thread(target=builder, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])
