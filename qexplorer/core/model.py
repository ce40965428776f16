"""What a model is, as far as planning and results need: its shape, not its weights.

No dependencies beyond the standard library and :mod:`qexplorer.core.kinds`:
every module that talks about a model imports this one, and nothing here
reads files (that is :mod:`qexplorer.core.readers`) or searches for models
(that is :mod:`qexplorer.core.catalog`).

Parameters are counted per tensor group (:class:`TensorGroup`), which is what
the planner needs: embeddings and lm_head stay at higher precision in most
schemes, and llama.cpp's K-quants fall back to other types for rows that are
not a multiple of 256.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qexplorer.core.kinds import ModelFormat, TensorRole


@dataclass(frozen=True)
class TensorGroup:
    """``count`` weight tensors of ``rows`` × ``cols`` (cols = input features)."""

    role: TensorRole
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
    format: ModelFormat
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
        experts = sum(g.params for g in self.groups if g.role == TensorRole.EXPERT)
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
