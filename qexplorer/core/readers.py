"""Reading a model's shape from its files without loading weights.

``config.json`` plus safetensors headers for a Hugging Face folder, GGUF
metadata (through the bounded reader in :mod:`qexplorer.core.gguf_header`) for
a ``.gguf`` file. Every failure is a :class:`~qexplorer.core.errors.ModelReadError`
with one sentence for a person.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qexplorer.core.errors import ModelReadError
from qexplorer.core.gguf_header import GgufArray, GgufHeader, file_type_name, read_gguf_header
from qexplorer.core.kinds import ModelFormat, TensorRole
from qexplorer.core.model import ModelSpec, TensorGroup

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024

# Architectures whose shape qexplorer can plan. GGUF names map to the HF class.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "granite": "GraniteForCausalLM",
}
KNOWN_ARCHITECTURES = frozenset(GGUF_ARCHITECTURES.values()) | {"MixtralForCausalLM", "OlmoForCausalLM",
                                                                  "Olmo2ForCausalLM", "SmolLM3ForCausalLM"}


# ------------------------------------------------------------------- shapes
def _merge(groups: Iterable[TensorGroup]) -> tuple[TensorGroup, ...]:
    counts: Counter[tuple[str, int, int]] = Counter()
    for g in groups:
        counts[(g.role, g.rows, g.cols)] += g.count
    return tuple(TensorGroup(role, rows, cols, n) for (role, rows, cols), n in sorted(counts.items()))


def groups_from_shape(*, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
                      vocab: int, tied: bool, n_experts: int = 0, moe_intermediate: int = 0,
                      qk_norm: bool = False) -> tuple[TensorGroup, ...]:
    """Tensor groups of a decoder-only transformer from its config (biases ignored: < 0.1 %)."""
    groups = [
        TensorGroup(TensorRole.EMBEDDING, vocab, hidden, 1),
        TensorGroup(TensorRole.LINEAR, heads * head_dim, hidden, layers),  # q
        TensorGroup(TensorRole.LINEAR, kv_heads * head_dim, hidden, 2 * layers),  # k, v
        TensorGroup(TensorRole.LINEAR, hidden, heads * head_dim, layers),  # o
        TensorGroup(TensorRole.NORM, 1, hidden, 2 * layers + 1),
    ]
    if qk_norm:
        groups.append(TensorGroup(TensorRole.NORM, 1, head_dim, 2 * layers))
    if not tied:
        groups.append(TensorGroup(TensorRole.LM_HEAD, vocab, hidden, 1))
    if n_experts:
        groups += [
            TensorGroup(TensorRole.EXPERT, moe_intermediate, hidden, 2 * n_experts * layers),  # gate, up
            TensorGroup(TensorRole.EXPERT, hidden, moe_intermediate, n_experts * layers),  # down
            TensorGroup(TensorRole.LINEAR, n_experts, hidden, layers),  # router
        ]
    else:
        groups += [
            TensorGroup(TensorRole.LINEAR, intermediate, hidden, 2 * layers),  # gate, up
            TensorGroup(TensorRole.LINEAR, hidden, intermediate, layers),  # down
        ]
    return _merge(groups)


# ------------------------------------------------------------------- GGUF
def _meta(header: GgufHeader, key: str, default: Any = None) -> Any:
    value = header.metadata.get(key, default)
    if isinstance(value, GgufArray):
        return value.items[0] if value.items else default
    return value


def _gguf_role(name: str, n_dims: int) -> TensorRole:
    if name.startswith("token_embd."):
        return TensorRole.EMBEDDING
    if name.startswith("output.") and not name.startswith("output_norm"):
        return TensorRole.LM_HEAD
    if "_exps." in name:
        return TensorRole.EXPERT
    if n_dims == 1:
        return TensorRole.NORM
    return TensorRole.LINEAR


def spec_from_gguf(path: Path, *, source: str = "path", name: str | None = None) -> ModelSpec:
    header = read_gguf_header(path)
    arch = _meta(header, "general.architecture")
    if not isinstance(arch, str):
        raise ModelReadError(f"{path.name} has no general.architecture key; it is not a model GGUF.")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelReadError(
            f"{path.name} is a {arch!r} model, which qexplorer cannot plan yet; "
            f"known GGUF architectures: {', '.join(sorted(GGUF_ARCHITECTURES))}."
        )

    def need(key: str) -> int:
        value = _meta(header, f"{arch}.{key}")
        if not isinstance(value, int) or value <= 0:
            raise ModelReadError(f"{path.name} lacks a valid {arch}.{key}; the file is incomplete.")
        return value

    layers, hidden, heads = need("block_count"), need("embedding_length"), need("attention.head_count")
    kv_heads = _meta(header, f"{arch}.attention.head_count_kv", heads) or heads
    head_dim = _meta(header, f"{arch}.attention.key_length") or hidden // heads
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    vocab = _meta(header, f"{arch}.vocab_size") or (tokens.length if isinstance(tokens, GgufArray) else 0)
    groups = []
    for tensor in header.tensors:
        role = _gguf_role(tensor.name, len(tensor.dims))
        cols = tensor.dims[0]
        rows = tensor.dims[1] if len(tensor.dims) > 1 else 1
        count = tensor.dims[2] if len(tensor.dims) > 2 else 1
        groups.append(TensorGroup(role, rows, cols, count))
    tied = not any(t.name.startswith("output.weight") for t in header.tensors)
    linear_types = Counter(t.type_name for t in header.tensors if len(t.dims) > 1)
    stored = file_type_name(_meta(header, "general.file_type")) or (
        linear_types.most_common(1)[0][0] if linear_types else "unknown")
    return ModelSpec(
        name=name or str(_meta(header, "general.name") or path.stem),
        path=str(path),
        format=ModelFormat.GGUF,
        architecture=GGUF_ARCHITECTURES[arch],
        n_layers=layers,
        hidden_size=hidden,
        n_heads=heads,
        n_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        vocab_size=int(vocab),
        max_context=int(_meta(header, f"{arch}.context_length", 0) or 0),
        intermediate_size=int(_meta(header, f"{arch}.feed_forward_length", 0) or 0),
        tied_embeddings=tied,
        stored_dtype=stored,
        size_on_disk_bytes=header.file_size,
        groups=_merge(groups),
        n_experts=int(_meta(header, f"{arch}.expert_count", 0) or 0),
        n_active_experts=int(_meta(header, f"{arch}.expert_used_count", 0) or 0),
        params_source="tensor headers",
        weights_format=ModelFormat.GGUF,
        source=source,
    )


# ------------------------------------------------------------------- Hugging Face folders
def _non_negative_ints(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of one safetensors file (8-byte length, then JSON)."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(0)
            raw_len = handle.read(8)
            if len(raw_len) < 8:
                raise ModelReadError(f"{path.name} is truncated: it is too short for a safetensors header.")
            (length,) = struct.unpack("<Q", raw_len)
            if length > min(MAX_SAFETENSORS_HEADER, size - 8):
                raise ModelReadError(f"{path.name} is truncated or corrupt: its header claims {length:,} bytes.")
            header = json.loads(handle.read(length))
    except PermissionError:
        raise ModelReadError(f"{path} cannot be read: permission denied.") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelReadError(f"{path.name} has a corrupt safetensors header.") from None
    if not isinstance(header, dict):
        raise ModelReadError(f"{path.name} has a corrupt safetensors header.")
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(info, dict) and _non_negative_ints(info.get("shape"))
                and _non_negative_ints(info.get("data_offsets")) and len(info["data_offsets"]) == 2):
            raise ModelReadError(f"{path.name} has a corrupt safetensors header (tensor {name!r}).")
        data_end = max(data_end, info["data_offsets"][1])
    if 8 + length + data_end > size:
        raise ModelReadError(
            f"{path.name} is truncated: its tensors end at byte {8 + length + data_end:,} "
            f"but the file has {size:,}; download it again."
        )
    return header


def _hf_role(name: str, shape: list[int]) -> TensorRole:
    if "embed_tokens" in name or name.endswith("wte.weight"):
        return TensorRole.EMBEDDING
    if name.startswith("lm_head"):
        return TensorRole.LM_HEAD
    if ".experts." in name:
        return TensorRole.EXPERT
    if len(shape) < 2:
        return TensorRole.NORM
    return TensorRole.LINEAR


def _config_int(config: dict[str, Any], key: str, folder: Path, default: int | None = None) -> int:
    """The one check every integer field of config.json passes: a non-negative JSON integer
    (not a bool, a string or a list), or the default where the key is absent or null."""
    value = config.get(key)
    if value is None and default is not None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ModelReadError(f"config.json in {folder} has no valid {key!r}; qexplorer cannot plan this model.")
    return value


def _config_first_int(config: dict[str, Any], keys: tuple[str, ...], folder: Path, default: int) -> int:
    """The first of several synonymous keys that is present (``num_experts`` / ``num_local_experts``)."""
    for key in keys:
        if config.get(key) is not None:
            return _config_int(config, key, folder)
    return default


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except PermissionError:
        raise ModelReadError(f"{path} cannot be read: permission denied.") from None
    except UnicodeDecodeError:
        raise ModelReadError(f"{path} is not text; it should be a JSON file.") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelReadError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
    if not isinstance(config, dict):
        raise ModelReadError(f"{path} is not a JSON object.")
    return config


def spec_from_folder(folder: Path, *, source: str = "path", name: str | None = None) -> ModelSpec:
    config = read_config(folder)
    architectures = config.get("architectures")
    if not architectures or not isinstance(architectures, list) or not isinstance(architectures[0], str):
        raise ModelReadError(f"config.json in {folder} names no architecture (its 'architectures' list is missing).")
    arch = architectures[0]
    if arch not in KNOWN_ARCHITECTURES:
        raise ModelReadError(
            f"{arch} (in {folder}) is an architecture qexplorer cannot plan yet; "
            f"known: {', '.join(sorted(KNOWN_ARCHITECTURES))}."
        )
    hidden = _config_int(config, "hidden_size", folder)
    layers = _config_int(config, "num_hidden_layers", folder)
    heads = _config_int(config, "num_attention_heads", folder)
    if not hidden or not layers or not heads:
        raise ModelReadError(f"config.json in {folder} has a zero hidden_size, layer or head count.")
    kv_heads = _config_int(config, "num_key_value_heads", folder, heads)
    head_dim = _config_int(config, "head_dim", folder, hidden // heads)
    vocab = _config_int(config, "vocab_size", folder)
    intermediate = _config_int(config, "intermediate_size", folder, 0)
    n_experts = _config_first_int(config, ("num_experts", "num_local_experts"), folder, 0)
    n_active = _config_int(config, "num_experts_per_tok", folder, 0)
    moe_intermediate = _config_int(config, "moe_intermediate_size", folder, intermediate) or intermediate
    tied = bool(config.get("tie_word_embeddings", False))
    quant = config.get("quantization_config") or {}
    stored = str(quant.get("quant_method") if isinstance(quant, dict) and quant.get("quant_method")
                 else config.get("torch_dtype") or config.get("dtype") or "unknown")
    stored = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(stored, stored)

    shards = sorted(folder.glob("*.safetensors"))
    pickles = sorted(folder.glob("pytorch_model*.bin")) + sorted(folder.glob("*.pt"))
    groups: tuple[TensorGroup, ...]
    if shards:
        found = []
        for shard in shards:
            for tensor_name, info in read_safetensors_header(shard).items():
                if tensor_name == "__metadata__":
                    continue
                shape = info["shape"]
                if not shape:
                    continue
                rows = shape[0] if len(shape) > 1 else 1
                cols = shape[-1]
                count = 1
                for extra in shape[1:-1]:
                    count *= extra
                found.append(TensorGroup(_hf_role(tensor_name, shape), rows, cols, count))
        groups, params_source, weights_format = _merge(found), "tensor headers", "safetensors"
    else:
        groups = groups_from_shape(
            hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
            intermediate=intermediate, vocab=vocab, tied=tied, n_experts=n_experts,
            moe_intermediate=moe_intermediate, qk_norm=arch.startswith("Qwen3"),
        )
        params_source = "config shape"
        weights_format = "pickle" if pickles else "none"
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return ModelSpec(
        name=name or folder.name,
        path=str(folder),
        format=ModelFormat.HF,
        architecture=arch,
        n_layers=layers,
        hidden_size=hidden,
        n_heads=heads,
        n_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        max_context=_config_int(config, "max_position_embeddings", folder, 0),
        intermediate_size=intermediate,
        tied_embeddings=tied,
        stored_dtype=stored,
        size_on_disk_bytes=size,
        groups=groups,
        n_experts=n_experts,
        n_active_experts=n_active,
        params_source=params_source,
        weights_format=weights_format,
        needs_remote_code="auto_map" in config,
        source=source,
    )


def spec_from_path(path: Path, *, source: str = "path", name: str | None = None) -> ModelSpec:
    """A GGUF file or a model folder; anything else is one clear error."""
    try:
        is_dir = path.is_dir()
        exists = path.exists()
    except PermissionError:
        raise ModelReadError(f"{path} cannot be read: permission denied.") from None
    if not exists:
        raise ModelReadError(f"{path} does not exist.")
    if not os.access(path, os.R_OK | (os.X_OK if is_dir else 0)):
        raise ModelReadError(f"{path} cannot be read: permission denied.")
    if not is_dir:
        return spec_from_gguf(path, source=source, name=name)
    if (path / "config.json").exists():
        return spec_from_folder(path, source=source, name=name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return spec_from_gguf(ggufs[0], source=source, name=name)
    if ggufs:
        raise ModelReadError(f"{path} holds {len(ggufs)} GGUF files; name one of them.")
    raise ModelReadError(f"{path} is not a model folder: it has no config.json and no .gguf file.")
