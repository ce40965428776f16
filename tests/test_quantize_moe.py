"""A MoE's routers stay BF16 in every llm-compressor scheme; an artifact far above its plan is refused.

The quantizing tests run llm-compressor for real on a 2-layer random MoE (tests/models.tiny_moe): a second
each on a CPU, data-free schemes only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from models import tiny_moe

from qexplorer.core.domain.events import Log, drive
from qexplorer.core.errors import UserError
from qexplorer.core.precisions import get
from qexplorer.core.quantize.artifact import check_size, oversize_reason, weight_file_bytes
from qexplorer.core.readers import spec_from_folder

ROUTERS = {"qwen3_moe": ("mlp.gate",), "qwen2_moe": ("mlp.gate", "mlp.shared_expert_gate")}
# how each scheme stores a quantized weight: (tensor, safetensors dtype); INT4 and FP4 pack several per element
QUANTIZED = {"fp8": ("weight", "F8_E4M3"), "int8": ("weight", "I8"), "int4_rtn": ("weight_packed", "I32"),
             "nvfp4a16": ("weight_packed", "U8")}


def _tensors(folder: Path) -> dict[str, str]:
    """Tensor name → safetensors dtype, read from the shards' headers."""
    found = {}
    for shard in folder.glob("*.safetensors"):
        raw = shard.read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        found |= {name: info["dtype"] for name, info in header.items() if name != "__metadata__"}
    return found


@pytest.mark.parametrize("arch", sorted(ROUTERS))
@pytest.mark.parametrize("key", sorted(QUANTIZED))
def test_every_scheme_keeps_the_moe_routers_in_bf16(tmp_path: Path, arch: str, key: str):
    """On the old code (scheme recipes ignored only lm_head, W4A16 added mlp.gate) Qwen2-MoE's shared-expert
    gate - an nn.Linear in transformers 5 - came out FP8 / INT8 / INT4 / FP4 with a weight scale. Qwen3-MoE's
    router stayed BF16 even then (transformers 5 makes it a TopKRouter, not an nn.Linear); its cases keep it so."""
    from qexplorer.core.quantize.artifact import produce

    spec = spec_from_folder(tiny_moe(tmp_path / arch, arch))
    logs: list[Log] = []
    folder = drive(produce(spec, get(key), tmp_path / "work"), lambda e: logs.append(e) if isinstance(e, Log) else None)
    tensors = _tensors(folder)
    ignore = json.loads((folder / "config.json").read_text())["quantization_config"]["ignore"]
    for layer in range(2):
        for router in ROUTERS[arch]:
            name = f"model.layers.{layer}.{router}"
            assert tensors[f"{name}.weight"] == "BF16"
            assert not any(t.startswith(f"{name}.weight_") for t in tensors), f"{name} has quantization scales"
            assert name in ignore
    # the experts themselves were quantized: llm-compressor linearized the fused blocks and said so
    stored, dtype = QUANTIZED[key]
    assert tensors[f"model.layers.0.mlp.experts.0.down_proj.{stored}"] == dtype
    assert any("linearized 2 expert blocks" in log.message for log in logs)
    assert not any(log.is_warning and "MoE" in log.message for log in logs)


def _fake_folder(folder: Path, shard_bytes: int, tokenizer_bytes: int = 0) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with open(folder / "model.safetensors", "wb") as shard:
        shard.truncate(shard_bytes)  # sparse: the size is what is checked
    with open(folder / "tokenizer.json", "wb") as tokenizer:
        tokenizer.truncate(tokenizer_bytes)
    return folder


def test_only_weight_files_count(tmp_path: Path):
    folder = _fake_folder(tmp_path / "fp8-compressed-tensors", 1000, tokenizer_bytes=5000)
    assert weight_file_bytes(folder) == 1000
    gguf = tmp_path / "q4_k_m.gguf"
    gguf.write_bytes(b"x" * 700)
    assert weight_file_bytes(gguf) == 700


def test_an_fp8_moe_folder_twice_its_plan_is_refused_in_one_sentence(tmp_path: Path):
    folder = _fake_folder(tmp_path / "fp8-compressed-tensors", 2_000_000_000)
    reason = oversize_reason(get("fp8"), True, folder, 2_000_000_000, 1_050_000_000)
    assert reason is not None and reason.count(". ") == 0 and reason.endswith(".")
    assert reason.startswith("The FP8 artifact fp8-compressed-tensors holds 1.86 GiB of weights, 1.9× its planned "
                             "1001.36 MiB: its experts were probably left in BF16")
    assert "refusing" in reason and str(folder) in reason


@pytest.mark.parametrize(("ratio", "refused"), [(0.5, False), (1.0, False), (1.25, False), (1.26, True), (2.0, True)])
def test_the_limit_is_25_percent_above_the_plan(tmp_path: Path, ratio: float, refused: bool):
    planned = 1_000_000
    for key in ("fp8", "int4_rtn", "fp16", "q4_k_m"):
        reason = oversize_reason(get(key), False, tmp_path / "artifact", int(planned * ratio), planned)
        assert (reason is not None) == refused
        if refused:
            assert get(key).label in reason


def test_an_oversized_artifact_is_refused_where_it_is_produced(tmp_path: Path):
    """produce() - which the measuring job and the export both call - checks the folder it found (or made)
    against the plan, counting the safetensors shards only: a tokenizer larger than the weights passes."""
    from qexplorer.core.planner import weight_bytes
    from qexplorer.core.quantize.artifact import produce

    spec = spec_from_folder(tiny_moe(tmp_path / "moe", "qwen3_moe"))
    planned = weight_bytes(spec, get("fp8"))
    _fake_folder(tmp_path / "ok" / "fp8-compressed-tensors", planned, tokenizer_bytes=10 * planned)
    assert drive(produce(spec, get("fp8"), tmp_path / "ok")).name == "fp8-compressed-tensors"
    _fake_folder(tmp_path / "big" / "fp8-compressed-tensors", 2 * planned)
    with pytest.raises(UserError, match=r"2\.0× its planned .*experts were probably left in BF16"):
        drive(produce(spec, get("fp8"), tmp_path / "big"))
    # an FP32 Hugging Face folder's BF16 artifact is a cast (issue 23 item 4), at its planned size - the folder
    # itself, twice that, would have been refused
    fp32 = spec_from_folder(tiny_moe(tmp_path / "moe-fp32", "qwen3_moe", dtype="float32"))
    cast = drive(produce(fp32, get("bf16"), tmp_path / "fp32-work"))
    assert cast == tmp_path / "fp32-work" / "bf16-checkpoint" != Path(fp32.path)
    with pytest.raises(UserError, match=r"2\.0× its planned"):
        check_size(fp32, get("bf16"), Path(fp32.path))

