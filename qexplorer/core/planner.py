"""Memory plan per precision, and the verdict against live headroom.

For a model, a precision and a request (context length, batch, KV dtype):

    weight_bytes   = Σ over tensor groups  params(group) × bits(precision, group) / 8
    kv_bytes/token = 2 (K and V) × n_layers × n_kv_heads × head_dim × bytes(kv dtype)   (GQA-aware)
    kv_cache_bytes = kv_bytes/token × context × batch
    overhead_bytes = runtime base + activations of one prefill chunk
                     activations = batch × min(context, 512) × (hidden × 4 B × 8 + vocab × 4 B)
                  (llama.cpp: vocab × 4 B once - it keeps the last position's logits only)
    total_bytes    = weight_bytes + kv_cache_bytes + overhead_bytes
    capacity       = the sequences of ``context`` tokens whose KV cache fits in headroom − weights − overhead,
                     rounded the engine's way (vLLM's blocks, llama.cpp's slots): :mod:`qexplorer.core.capacity`

``bits(precision, group)`` comes from :mod:`qexplorer.core.precisions`
(embeddings, lm_head and norms stay at higher precision in torch schemes;
llama.cpp falls back for rows that are not a multiple of 256).

The runtime base is stated, not guessed per run: vLLM's CPU server tree (API
server, engine core, worker) holds about 2.3 GiB besides its weights and KV
cache; on a GPU its device side is counted like a PyTorch process, about
370 MiB; a llama.cpp worker about 110 MiB (KV and compute buffers of a
512-token batch included) - measured on a
2-core x86 CPU with the bundled model (README "Planner vs measured") - plus a
CUDA context on a GPU (~0.5 / 0.3 GiB, NVIDIA's usual figure). llama.cpp keeps
only the last position's logits; transformers computes them for the whole
prompt chunk, which the activation term counts.

Verdict against headroom (telemetry: MemAvailable − reserve on unified memory
and CPU, free VRAM on a discrete card):

    margin = headroom − total
    "does not fit" if margin < 0; "tight" if margin < max(10 % of total, 1 GiB); else "fits".
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

from qexplorer.core.capacity import Capacity, plan_capacity
from qexplorer.core.errors import UserError
from qexplorer.core.kinds import Engine, Family, Producer, RunsOn, SupportMode, TensorRole, Verdict
from qexplorer.core.model import ModelSpec
from qexplorer.core.precisions import BY_KEY, PRECISIONS, Hardware, Precision, Support
from qexplorer.core.telemetry import TelemetrySnapshot
from qexplorer.core.units import GIB, MIB

KV_DTYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "fp8": 1.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
PREFILL_CHUNK_TOKENS = 512
TORCH_RUNTIME_BYTES = 370 * MIB
LLAMA_CPP_RUNTIME_BYTES = 110 * MIB
# Extra memory of a quantize-and-benchmark job (plan_job_peak), measured like the bases above.
VLLM_RUNTIME_BYTES = 2300 * MIB  # vLLM 0.32 CPU server tree (API server, engine core, worker) without weights / KV
LLMCOMPRESSOR_IMPORT_BYTES = 510 * MIB
CALIBRATION_BYTES = 180 * MIB
CUDA_CONTEXT_BYTES = {"torch": 512 * MIB, "gguf": 300 * MIB}
# The quality pass, measured on the bundled model (ctx 512, vocabulary 49152: 96 MiB of float32 logits per chunk):
# llama.cpp's candidate pass held 7.3 chunks of logits beyond its serving plan and a second mapping of the weights
# (llama.cpp's logits buffer, llama-cpp-python's scores array, our copy, the log-softmax and its exp, ...); the
# reference pass in PyTorch 7.7 beyond the BF16 model; the transformers fallback's candidate pass 4.2 beyond its
# benchmark (BF16 logits, their float32 copy, the log-softmax and its exp); vLLM's prompt log-probs 2.8 inside
# its server.
QUALITY_LOGITS_COPIES = 7
FALLBACK_LOGITS_COPIES = 4
SERVER_LOGPROB_COPIES = 3
# vLLM-CPU's server tree holds about half its weights again at its peak (the safetensors pages it maps while it
# copies them): fitted on the scale benchmark's BF16 and INT8 jobs, 0.13-1.07 B (README, Benchmarks)
VLLM_CPU_WEIGHT_COPIES = 1.5
TIGHT_FRACTION = 0.10
TIGHT_MIN_BYTES = 1 * GIB


@dataclass(frozen=True)
class PlanRequest:
    context: int = 4096
    batch: int = 1
    kv_dtype: str = "f16"
    # vLLM's overhead on this machine's GPU as its own runs measured it (DurationBook.learned_bytes); None: the
    # published default for the device (vllm_launch.overhead_bytes)
    vllm_overhead_bytes: int | None = None

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
    family: Family
    runs_on: RunsOn
    bits_per_weight: float  # weight_bytes × 8 / params
    group_size: int | None
    weight_bytes: int
    kv_bytes_per_token: int
    kv_cache_bytes: int
    overhead_bytes: int
    total_bytes: int
    headroom_bytes: int | None
    margin_bytes: int | None
    verdict: Verdict
    support: SupportMode
    support_note: str
    servers: tuple[str, ...]
    engine: Engine  # the engine that serves it (vLLM for Hugging Face formats, llama.cpp for GGUF)
    vllm: VllmServePlan | None = None  # how vLLM will be started for it on this device
    capacity: Capacity | None = None  # sequences at the chosen context that fit in the headroom (core.capacity)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["servers"] = list(self.servers)
        return data


@dataclass(frozen=True)
class VllmServePlan:
    """The ``vllm serve`` a job will run for one precision on this device, decided before anything loads."""

    command: str  # with ARTIFACT for the folder the job makes
    utilization: float | None  # --gpu-memory-utilization (CUDA), from the live free memory
    graphs: str
    dtype: str
    expected_kernel: str
    overhead_bytes: int  # vLLM beyond weights and KV cache on this device (CUDA: GB10's field figure or a refit)
    overhead_source: str
    start_refusal: str | None  # why vLLM would not be started (its start-up check could not pass)


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
    if not precision.is_gguf and on_gpu:
        # vLLM on a GPU: CUDA context, activations, CUDA-graph pool, API server and engine core, as one measured
        # figure (vllm_launch.VLLM_CUDA_OVERHEAD_BYTES: 5.4-6.7 GiB on a DGX Spark) or this machine's refit
        from qexplorer.core.serving.vllm_launch import VLLM_CUDA_OVERHEAD_BYTES

        return request.vllm_overhead_bytes or VLLM_CUDA_OVERHEAD_BYTES
    if precision.is_gguf:
        base = LLAMA_CPP_RUNTIME_BYTES
    else:  # vLLM-CPU: its whole server tree is host memory; the transformers fallback: PyTorch
        base = TORCH_RUNTIME_BYTES if precision.vllm_cpu_gap else VLLM_RUNTIME_BYTES
    if on_gpu:
        base += CUDA_CONTEXT_BYTES[precision.family]
    chunk = min(request.context, PREFILL_CHUNK_TOKENS)
    if precision.is_gguf:  # llama.cpp computes logits for the last position only
        activations = request.batch * (chunk * spec.hidden_size * 4 * 8 + spec.vocab_size * 4)
    else:
        activations = request.batch * chunk * (spec.hidden_size * 4 * 8 + spec.vocab_size * 4)
    return base + activations


def verdict(total: int, headroom: int | None) -> tuple[Verdict, int | None]:
    if headroom is None:
        return Verdict.UNKNOWN, None
    margin = headroom - total
    if margin < 0:
        return Verdict.DOES_NOT_FIT, margin
    if margin < max(TIGHT_FRACTION * total, TIGHT_MIN_BYTES):
        return Verdict.TIGHT, margin
    return Verdict.FITS, margin


@functools.lru_cache(maxsize=1)
def llama_cpp_offloads() -> bool:
    """Whether the installed llama.cpp was built with a GPU backend: a CPU-only build on a GPU box runs GGUF
    on the CPU, and its plan must say so (host memory, no CUDA context)."""
    try:
        import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())


def runs_on_gpu(precision: Precision, hardware: Hardware, simulated: bool = False) -> bool:
    """The device a precision's job will actually use: the GPU if there is one - for GGUF only if this machine's
    llama.cpp can offload to it (a simulated GPU box is assumed to have a CUDA build)."""
    return hardware.cuda and (not precision.is_gguf or simulated or llama_cpp_offloads())


def plan_precision(spec: ModelSpec, precision: Precision, request: PlanRequest,
                   snapshot: TelemetrySnapshot | None) -> PrecisionPlan:
    hardware = hardware_from_snapshot(snapshot)
    support: Support = precision.support(hardware)
    on_gpu = runs_on_gpu(precision, hardware, simulated=bool(snapshot and snapshot.simulated))
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
    engine = Engine.TRANSFORMERS if not on_gpu and precision.vllm_cpu_gap else precision.engine
    return PrecisionPlan(
        precision=precision.key,
        label=precision.label,
        family=precision.family,
        runs_on=RunsOn.GPU if on_gpu else RunsOn.CPU,
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
        support_note=support.note if on_gpu or not precision.vllm_cpu_gap else
        f"{precision.vllm_cpu_gap}; measured with transformers, weights dequantized - not serving speed",
        servers=precision.servers,
        engine=engine,
        vllm=None if precision.is_gguf or (not on_gpu and precision.vllm_cpu_gap) else
        vllm_serve_plan(spec, precision, request, snapshot, weights),
        capacity=plan_capacity(engine, "cuda" if on_gpu else "cpu", request.kv_dtype, per_token, request.context,
                               headroom, weights, overhead),
    )


def vllm_serve_plan(spec: ModelSpec, precision: Precision, request: PlanRequest, snapshot: TelemetrySnapshot | None,
                    weights: int) -> VllmServePlan:
    """The command, start-up check and kernel of the vLLM a job would start for ``precision`` (the job itself
    re-reads the free memory just before it starts)."""
    from qexplorer.core.device import device_from_snapshot
    from qexplorer.core.serving.vllm_kernels import expected
    from qexplorer.core.serving.vllm_launch import (
        LaunchSettings,
        dtype_for,
        kv_cache_bytes,
        overhead_bytes,
        shell_command,
        start_check,
    )

    device = device_from_snapshot(snapshot)
    max_model_len = request.context + 16
    kv = kv_cache_bytes(kv_bytes_per_token(spec, "bf16"), max_model_len, request.batch, device)
    overhead = overhead_bytes(device, request.vllm_overhead_bytes)
    check = start_check(device, weights + kv + overhead)
    settings = LaunchSettings(max_model_len, request.batch, kv, False, dtype_for(precision), device,
                              utilization=check.utilization)
    source = ("vLLM-CPU 0.32 server tree, measured here" if not device.cuda else
              "refitted from this machine's vLLM runs" if request.vllm_overhead_bytes else
              "a DGX Spark figure (llamastash#80) until this machine's own vLLM runs refit it")
    return VllmServePlan(
        command=shell_command(["vllm", "serve", "ARTIFACT", *settings.flags()]),
        utilization=check.utilization, graphs=settings.graphs, dtype=settings.dtype,
        expected_kernel=expected(precision, device.kind, device.compute_capability), overhead_bytes=overhead,
        overhead_source=source, start_refusal=check.refusal)


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


@dataclass(frozen=True)
class QualityPlan:
    """The quality pass a job runs: the candidate's logits over ``ctx``-token chunks, and - for the first job
    of a model and corpus - the reference pass that computes and caches the reference's."""

    ctx: int = 512
    builds_reference: bool = False


def logits_bytes(spec: ModelSpec, ctx: int) -> int:
    """One chunk's logits as float32: every position × the vocabulary."""
    return ctx * spec.vocab_size * 4


def expert_bytes(spec: ModelSpec, precision: Precision) -> int:
    """A MoE's expert weights at this precision (0 for a dense model)."""
    return int(sum(g.params * precision.bits_for(g, spec) for g in spec.groups if g.role == TensorRole.EXPERT) / 8)


def reference_peak(spec: ModelSpec, ctx: int) -> int:
    """The reference pass: PyTorch + the BF16 model + its chunk's logits and their copies. A MoE's experts are
    held twice while transformers loads them (per-expert tensors fused into one per layer): measured 4.60 GiB
    for the 0.99 B scale-benchmark MoE, whose BF16 weights are 1.84 GiB (1.69 GiB of experts)."""
    bf16 = BY_KEY["bf16"]
    return (TORCH_RUNTIME_BYTES + weight_bytes(spec, bf16) + expert_bytes(spec, bf16)
            + QUALITY_LOGITS_COPIES * logits_bytes(spec, ctx))


def plan_job_peak(spec: ModelSpec, precision: Precision, bench: Any, on_gpu: bool, vllm: bool | None = None,
                  quality: QualityPlan | None = None, vllm_overhead: int | None = None, tasks: bool = False,
                  load: Any = None) -> int:
    """Predicted peak memory of one job's process tree (what the guard compares against).

    GGUF (llama.cpp in the worker): the serving plan for pp + tg tokens; the quantizer streams tensors.
    Hugging Face precisions: the worker (PyTorch + transformers) plus what producing the artifact holds
      cast            half a BF16 copy while converting from the BF16 source (none for bf16 itself)
      llm-compressor  the library + the BF16 model being quantized [GPTQ: + calibration and one layer's Hessians]
    plus, while it runs, the vLLM server it starts (runtime + weights + the KV cache it is given); or, in the
    transformers fallback (``vllm=False``), the serving plan inside the worker.
    With ``quality``: the candidate's pass (llama.cpp: a second context holding every position's logits; vLLM:
    its prompt log-probs inside the server; the fallback: logits in the worker) and, where this job builds it,
    the reference pass - phases that run one after another, so the peak is the largest of them.
    With ``tasks`` (core.tasks.run): llama.cpp and the fallback generate in a context of TASK_CONTEXT_TOKENS of
    their own after the benchmark's is released; vLLM is started with KV for TASK_CONCURRENCY sequences of that
    length (engines.vllm.launch_settings), rounded to its blocks as the launch rounds them.
    With ``load`` (a LoadSweepSpec): vLLM holds KV for its highest level's sequences of the sweep's context;
    llama.cpp's sweep runs in llama-server, a process of the job's tree, with the weights and one KV slot per
    stream (256-token padded cells, core.capacity) while the worker holds nothing of its own.
    """
    from qexplorer.core.tasks.run import TASK_CONCURRENCY, TASK_CONTEXT_TOKENS

    task_ctx = TASK_CONTEXT_TOKENS if tasks else 0
    request = PlanRequest(context=bench.context_tokens)  # depth + pp + tg: the deepest test's KV cache
    logits = logits_bytes(spec, quality.ctx) if quality else 0
    reference = reference_peak(spec, quality.ctx) if quality and quality.builds_reference else 0
    if precision.is_gguf:
        weights = weight_bytes(spec, precision)
        serving = (weights + kv_bytes_per_token(spec, "f16") * max(request.context, task_ctx)
                   + overhead_bytes(spec, precision, PlanRequest(context=bench.prompt_tokens), on_gpu))
        if load is not None:
            from qexplorer.core.capacity import LLAMA_CPP_PAD_TOKENS

            cells = -(-load.context_tokens // LLAMA_CPP_PAD_TOKENS) * LLAMA_CPP_PAD_TOKENS * load.slots
            serving = max(serving, weights + kv_bytes_per_token(spec, "f16") * cells
                          + overhead_bytes(spec, precision, PlanRequest(context=load.prompt_tokens), on_gpu))
        if not quality:
            return serving
        # a second context maps the weights again; PyTorch stays imported after a reference pass
        candidate = (serving + weights + QUALITY_LOGITS_COPIES * logits
                     + (TORCH_RUNTIME_BYTES if quality.builds_reference else 0))
        return max(serving, candidate, reference)
    bf16 = weight_bytes(spec, BY_KEY["bf16"])
    if precision.producer == Producer.CAST:
        production = 0 if precision.key == "bf16" else bf16 // 2
    else:
        # a MoE's experts are copied when llm-compressor linearizes them (quantize.moe)
        production = LLMCOMPRESSOR_IMPORT_BYTES + bf16 + expert_bytes(spec, BY_KEY["bf16"])
        if precision.needs_calibration:
            production += CALIBRATION_BYTES + (layer_hessian_bytes(spec) if precision.key == "gptq" else 0)
    worker = TORCH_RUNTIME_BYTES + production
    if vllm is None:
        vllm = on_gpu or not precision.vllm_cpu_gap
    if vllm:
        from qexplorer.core.serving.vllm_launch import VLLM_CUDA_OVERHEAD_BYTES, serve_shape

        # the KV cache the job will start vLLM with (engines.vllm.launch_settings: the same phases and rule)
        demands = [(request.context + 16, 1)]
        if quality:
            demands.append((quality.ctx + 16, 1))
        if tasks:
            demands.append((task_ctx, TASK_CONCURRENCY))
        if load is not None:
            demands.append((load.context_tokens, load.slots))
        kv = serve_shape(kv_bytes_per_token(spec, "bf16"), demands, "cuda" if on_gpu else "cpu")[2]
        server = (((vllm_overhead or VLLM_CUDA_OVERHEAD_BYTES) if on_gpu else VLLM_RUNTIME_BYTES)
                  + int(weight_bytes(spec, precision) * (1 if on_gpu else VLLM_CPU_WEIGHT_COPIES)) + kv)
        # the worker releases the model it quantized before vLLM starts (llm-compressor's session and PyTorch's
        # cache; the library stays imported): producing and serving are one after the other
        residual = TORCH_RUNTIME_BYTES + (LLMCOMPRESSOR_IMPORT_BYTES if precision.producer == Producer.LLMCOMPRESSOR
                                          else 0)
        return max(worker, residual + server + SERVER_LOGPROB_COPIES * logits, reference)
    fallback = worker + weight_bytes(spec, precision) + kv_bytes_per_token(spec, "f16") * max(request.context,
                                                                                               task_ctx) + \
        overhead_bytes(spec, precision, PlanRequest(context=bench.prompt_tokens), on_gpu) - TORCH_RUNTIME_BYTES
    return max(fallback + FALLBACK_LOGITS_COPIES * logits, reference)


def active_weight_fraction(spec: ModelSpec, precision: Precision) -> float:
    """The share of the weight bytes one decoded token reads: every dense tensor and the output projection,
    the top-k of the experts (MoE), one row of an untied embedding table (a lookup, not a matmul)."""
    total = active = 0.0
    for group in spec.groups:
        size = group.params * precision.bits_for(group, spec) / 8
        total += size
        if group.role == TensorRole.EXPERT and spec.n_experts:
            active += size * spec.n_active_experts / spec.n_experts
        elif group.role == TensorRole.EMBEDDING and not spec.tied_embeddings:
            active += size / max(1, group.rows)
        else:
            active += size
    return active / total if total else 1.0


def decode_bytes_per_token(spec: ModelSpec, precision: Precision, weight_bytes: int, gen_tokens: int,
                           depth: int = 0, kv_dtype: str = "f16") -> int:
    """Bytes read from memory per decoded token, the roofline's denominator (FACTS §3): the active share of the
    artifact's weights plus the KV cache read at the mean context of the timed decode (``depth`` + half of
    ``gen_tokens``, as in llama-bench's tg at depth ``-d``)."""
    mean_context = depth + gen_tokens / 2
    return int(weight_bytes * active_weight_fraction(spec, precision)
               + kv_bytes_per_token(spec, kv_dtype) * mean_context)


def layer_hessian_bytes(spec: ModelSpec) -> int:
    """GPTQ keeps an fp32 cols × cols Hessian per linear module of the layer being calibrated."""
    per_layer = [g for g in spec.groups if g.role in (TensorRole.LINEAR, TensorRole.EXPERT)]
    return sum(4 * g.cols * g.cols * max(1, g.count // max(1, spec.n_layers)) for g in per_layer)


def hardware_for(on_gpu: bool) -> Hardware:
    return Hardware(cuda=on_gpu)
