"""Memory plan per precision, and the verdict against live headroom.

For a model, a precision and a request (context length, batch, KV dtype):

    weight_bytes   = Σ over tensor groups  params(group) × bits(precision, group) / 8
    kv_bytes/token = 2 (K and V) × n_layers × n_kv_heads × head_dim × bytes(kv dtype)   (GQA-aware)
    kv_cache_bytes = kv_bytes/token × context × batch
    overhead_bytes = runtime base + activations of one prefill chunk
                     activations = batch × min(context, 512) × (hidden × 4 B × 8 + vocab × 4 B)
    total_bytes    = weight_bytes + kv_cache_bytes + overhead_bytes

``bits(precision, group)`` comes from :mod:`qexplorer.core.precisions`
(embeddings, lm_head and norms stay at higher precision in torch schemes;
llama.cpp falls back for rows that are not a multiple of 256).

The runtime base is stated, not guessed per run: a PyTorch + transformers
process holds about 0.6 GiB before any weights (measured here: ``import
torch, transformers`` RSS), plus ~0.5 GiB of CUDA context on a GPU;
llama.cpp's process about 0.1 GiB (+0.3 GiB CUDA context).

Verdict against headroom (telemetry: MemAvailable − reserve on unified memory
and CPU, free VRAM on a discrete card):

    margin = headroom − total
    "does not fit" if margin < 0; "tight" if margin < max(10 % of total, 1 GiB); else "fits".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from qexplorer.core.catalog import ModelSpec
from qexplorer.core.errors import UserError
from qexplorer.core.precisions import PRECISIONS, Hardware, Precision, Support
from qexplorer.core.telemetry import TelemetrySnapshot
from qexplorer.core.units import GIB, MIB

KV_DTYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "fp8": 1.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
PREFILL_CHUNK_TOKENS = 512
TORCH_RUNTIME_BYTES = 600 * MIB
LLAMA_CPP_RUNTIME_BYTES = 100 * MIB
CUDA_CONTEXT_BYTES = {"torch": 512 * MIB, "gguf": 300 * MIB}
TIGHT_FRACTION = 0.10
TIGHT_MIN_BYTES = 1 * GIB


@dataclass(frozen=True)
class PlanRequest:
    context: int = 4096
    batch: int = 1
    kv_dtype: str = "f16"

    def __post_init__(self) -> None:
        if self.context < 1:
            raise UserError(f"Context length {self.context} is not positive; give a number of tokens such as 4096.")
        if self.batch < 1:
            raise UserError(f"Batch size {self.batch} is not positive.")
        if self.kv_dtype not in KV_DTYPE_BYTES:
            raise UserError(f"Unknown KV-cache dtype {self.kv_dtype!r}; choose from {', '.join(KV_DTYPE_BYTES)}.")


@dataclass(frozen=True)
class PrecisionPlan:
    precision: str
    label: str
    family: str
    runs_on: str  # "GPU" or "CPU"
    bits_per_weight: float  # weight_bytes × 8 / params
    group_size: int | None
    weight_bytes: int
    kv_bytes_per_token: int
    kv_cache_bytes: int
    overhead_bytes: int
    total_bytes: int
    headroom_bytes: int | None
    margin_bytes: int | None
    verdict: str  # "fits", "tight", "does not fit", "unknown"
    support: str  # "native", "emulated", "unavailable"
    support_note: str
    servers: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["servers"] = list(self.servers)
        return data


def hardware_from_snapshot(snapshot: TelemetrySnapshot | None) -> Hardware:
    if snapshot is None or not snapshot.devices:
        return Hardware(cuda=False)
    device = snapshot.devices[0]
    return Hardware(cuda=True, compute_capability=device.compute_capability, unified=bool(device.unified),
                    name=device.name)


def weight_bytes(spec: ModelSpec, precision: Precision) -> int:
    return int(sum(g.params * precision.bits_for(g, spec) for g in spec.groups) / 8)


def kv_bytes_per_token(spec: ModelSpec, kv_dtype: str) -> int:
    return int(2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * KV_DTYPE_BYTES[kv_dtype])


def overhead_bytes(spec: ModelSpec, precision: Precision, request: PlanRequest, on_gpu: bool) -> int:
    family = "gguf" if precision.is_gguf else "torch"
    base = LLAMA_CPP_RUNTIME_BYTES if precision.is_gguf else TORCH_RUNTIME_BYTES
    if on_gpu:
        base += CUDA_CONTEXT_BYTES[family]
    chunk = min(request.context, PREFILL_CHUNK_TOKENS)
    activations = request.batch * chunk * (spec.hidden_size * 4 * 8 + spec.vocab_size * 4)
    return base + activations


def verdict(total: int, headroom: int | None) -> tuple[str, int | None]:
    if headroom is None:
        return "unknown", None
    margin = headroom - total
    if margin < 0:
        return "does not fit", margin
    if margin < max(TIGHT_FRACTION * total, TIGHT_MIN_BYTES):
        return "tight", margin
    return "fits", margin


def plan_precision(spec: ModelSpec, precision: Precision, request: PlanRequest,
                   snapshot: TelemetrySnapshot | None) -> PrecisionPlan:
    hardware = hardware_from_snapshot(snapshot)
    support: Support = precision.support(hardware)
    on_gpu = hardware.cuda
    weights = weight_bytes(spec, precision)
    per_token = kv_bytes_per_token(spec, request.kv_dtype)
    kv_cache = per_token * request.context * request.batch
    overhead = overhead_bytes(spec, precision, request, on_gpu)
    total = weights + kv_cache + overhead
    headroom = None
    if snapshot is not None:
        value = snapshot.headroom_for(on_gpu=on_gpu).value
        headroom = None if value is None else int(value)
    fit, margin = verdict(total, headroom)
    return PrecisionPlan(
        precision=precision.key,
        label=precision.label,
        family=precision.family,
        runs_on="GPU" if on_gpu else "CPU",
        bits_per_weight=round(weights * 8 / max(1, spec.total_params), 3),
        group_size=precision.group_size(spec),
        weight_bytes=weights,
        kv_bytes_per_token=per_token,
        kv_cache_bytes=kv_cache,
        overhead_bytes=overhead,
        total_bytes=total,
        headroom_bytes=headroom,
        margin_bytes=margin,
        verdict=fit,
        support=support.mode,
        support_note=support.note,
        servers=precision.servers,
    )


def plan_model(spec: ModelSpec, request: PlanRequest, snapshot: TelemetrySnapshot | None,
               precisions: tuple[Precision, ...] = PRECISIONS) -> list[PrecisionPlan]:
    return [plan_precision(spec, p, request, snapshot) for p in precisions]


def plan_json(spec: ModelSpec, request: PlanRequest, snapshot: TelemetrySnapshot | None,
              plans: list[PrecisionPlan]) -> dict[str, Any]:
    hardware = hardware_from_snapshot(snapshot)
    notes = []
    if spec.max_context and request.context > spec.max_context:
        notes.append(f"context {request.context} exceeds the model's maximum of {spec.max_context} tokens")
    if spec.stored_quantized:
        notes.append(f"the stored weights are {spec.stored_dtype}: full-precision plans are for a dequantized copy")
    return {
        "schema": "qexplorer.plan/1",
        "model": spec.to_json(),
        "request": asdict(request),
        "hardware": {"label": hardware.label, "cuda": hardware.cuda,
                     "compute_capability": hardware.compute_capability, "unified": hardware.unified,
                     "simulated": snapshot.simulated if snapshot else None},
        "headroom_bytes": None if snapshot is None else snapshot.headroom_for(hardware.cuda).value,
        "reserve_bytes": None if snapshot is None else snapshot.reserve_bytes,
        "notes": notes,
        "plans": [p.to_json() for p in plans],
    }
