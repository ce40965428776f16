"""One job = one model × one precision: prepare, quantize, load, benchmark [, quality].

:func:`run_job` runs inside the worker process (``python -m qexplorer.worker``),
never in the UI process. It is a generator of job events
(:mod:`qexplorer.core.domain.events`) that *returns* a
:class:`~qexplorer.core.domain.record.RunRecord` (or, for an export, an
:class:`~qexplorer.core.domain.record.ExportRecord`); every step below returns
what it made the same way (``speed = yield from backend.run(...)``). It checks
``cancel`` between steps. The parent adds what only it can see (peak memory
from outside, the guard) and stores the record.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from qexplorer import __version__
from qexplorer.core import reuse
from qexplorer.core.artifacts import artifact_sha256, model_work_dir
from qexplorer.core.bench.bandwidth import roofline_note
from qexplorer.core.catalog import Catalog
from qexplorer.core.domain.bench import roofline_pct
from qexplorer.core.domain.events import JobEvent, Log, Phase, ReuseQuery, checked
from qexplorer.core.domain.phases import PhaseKind
from qexplorer.core.domain.record import ExportRecord, HardwareFacts, ModelIdentity, RunRecord, Speed
from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.engines.base import EngineContext, Measured, current_rss_bytes, peak_rss_bytes
from qexplorer.core.errors import UserError
from qexplorer.core.kinds import Engine, JobAction, ModelFormat, SupportMode
from qexplorer.core.model import ModelSpec
from qexplorer.core.pagecache import CacheDrop, drop_page_cache
from qexplorer.core.planner import decode_bytes_per_token
from qexplorer.core.precisions import Hardware, Precision, get
from qexplorer.core.quantize.artifact import produce, weight_file_bytes

LIBRARIES = ("torch", "transformers", "compressed_tensors", "llmcompressor", "llama_cpp_python", "textual")
T = TypeVar("T")
Step = Generator[JobEvent, None, T]


def library_versions() -> dict[str, str]:
    found = {"qexplorer": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return found


def cpu_name() -> str:
    from qexplorer.core.machine import cpu_model

    return cpu_model()


def run_job(job: JobSpec, cancel: threading.Event | None = None,
            ask_reuse: Callable[[ReuseQuery], RunRecord | None] | None = None) -> Step[RunRecord | ExportRecord]:
    """The whole job for one precision, as events; returns its record or raises. ``ask_reuse`` asks the parent
    for an earlier measurement with the same key (the worker's stdin; the worker never opens the store)."""
    precision = get(job.precision)
    spec = Catalog(extra_paths=job.model_paths, include_hf_cache=True, include_app_dirs=False).resolve(job.model_ref)
    from qexplorer.core.quantize import torch_quant
    from qexplorer.core.safety import check_loadable

    # the parent checked already; the worker checks again because it is the one that loads
    check_loadable(spec, trust_remote_code=job.trust_remote_code, allow_pickle=True)
    torch_quant.TRUST_REMOTE_CODE = job.trust_remote_code
    work_dir = model_work_dir(Path(job.data_dir), spec)
    yield Log(f"{spec.name} → {precision.label}; artifacts in {work_dir}")
    if job.action == JobAction.EXPORT:
        from qexplorer.core.export import export_model

        if not job.export_path:
            raise UserError("An export needs an output path (--out).")
        return (yield from checked(export_model(spec, precision, Path(job.export_path), work_dir,
                                                job.bench.threads), cancel))
    if job.tasks:  # refused before anything is made where HumanEval's programs could not be isolated
        from qexplorer.core.tasks.run import check_can_score

        check_can_score(job.tasks, job.allow_unisolated_exec)
    baseline_rss = current_rss_bytes()
    reference = None
    if job.quality:
        from qexplorer.core.reference import ensure_reference, job_device

        reference = yield from checked(ensure_reference(spec, job, work_dir, job_device()), cancel)
    started = time.perf_counter()
    artifact = yield from checked(produce(spec, precision, work_dir, job.bench.threads), cancel)
    quantize_s = time.perf_counter() - started
    if not precision.is_gguf:
        from qexplorer.core.engines.transformers import release_memory

        # llm-compressor leaves its session and PyTorch's cached GPU blocks behind (llm-compressor#2319): on a
        # card they would count against vLLM's start-up check in this same worker
        release_memory()
    yield Log(f"artifact {artifact.name}: its sha256 (hashed once, kept beside it while its files are unchanged), "
              "so the export can be checked against what was measured")
    sha256 = artifact_sha256(artifact, work_dir)
    ctx = _context(spec, precision, job, artifact, reference, cancel)
    key = reuse.reuse_key(job, sha256, library_versions(), _engine_version(precision), cpu_name(), ctx.gpu_name,
                          corpus_sha256=reference[0].corpus_sha256 if reference is not None else None)
    earlier = ask_reuse(ReuseQuery(spec.path, precision.key, key)) if job.reuse and ask_reuse else None
    if earlier is not None:
        yield Log(f"{precision.label}: the same artifact (sha256 {sha256[:12]}), engine, versions, machine and "
                  f"settings were measured as result #{earlier.reused_from}; showing that measurement again "
                  "(--remeasure times it anew)")
        return earlier
    yield from before_unified_load()
    measured = yield from checked(_measure(ctx), cancel)
    measured = replace(measured, engine=replace(measured.engine, artifact_path=str(artifact),
                                                artifact_bytes=_size(artifact), artifact_sha256=sha256))
    memory = replace(measured.memory, baseline_rss_bytes=baseline_rss, peak_rss_bytes=peak_rss_bytes(),
                     planned_peak_bytes=job.planned_peak_bytes, planned_total_bytes=job.planned_total_bytes)
    engine_weight_bytes = memory.bytes_per_token

    def read_per_token(speed: Speed) -> int | None:  # the engine's weight bytes → one decoded token's (MoE, KV)
        return decode_bytes_per_token(spec, precision, engine_weight_bytes, speed.gen_tokens,
                                      depth=speed.depth) if engine_weight_bytes else None

    if engine_weight_bytes:
        memory = replace(memory, bytes_per_token=read_per_token(measured.speed))
    # Bandwidth for the roofline is measured after the peak is recorded (its buffers
    # would count), in a phase the parent leaves out of its own peak.
    yield Phase(PhaseKind.CALIBRATE, "memory bandwidth for the roofline")
    hardware = _hardware(measured.gpu_name, Path(job.data_dir), measured.speed.threads)

    def roofline_of(speed: Speed) -> float | None:  # each depth against its own bytes per token (its KV term)
        per_token = read_per_token(speed)
        return roofline_pct(speed.decode_tok_s.mean, per_token, hardware.bandwidth_bytes_s) if per_token else None

    roofline = roofline_of(measured.speed)
    return RunRecord(
        model=ModelIdentity(name=spec.name, path=spec.path, ref=job.model_ref, params=spec.total_params,
                            stored_dtype=spec.stored_dtype, stored_quantized=spec.stored_quantized),
        precision=precision.key, precision_label=artifact_label(spec, precision), family=precision.family,
        engine=measured.engine, hardware=hardware, versions=library_versions(), bench=job.bench,
        memory=memory, timings=replace(measured.timings, quantize_s=quantize_s, quality_s=measured.quality_s),
        speed=measured.speed, depth_speeds=measured.depth_speeds, roofline_pct=roofline,
        depth_rooflines=tuple(roofline_of(s) for s in measured.depth_speeds),
        roofline_note=roofline_note(roofline, hardware.bandwidth_source),
        quality=measured.quality, engine_quality=measured.engine_quality, reuse_key=key, first_pass=job.first_pass,
        tasks=measured.tasks, task_error=measured.task_error, server=measured.server,
    )


def artifact_label(spec: ModelSpec, precision: Precision) -> str:
    """The row's label says what was measured: a Hugging Face source that is not BF16 gets a BF16 cast (its
    dtype named), and a quantized source is measured as stored - never called "BF16"."""
    from qexplorer.core.quantize.torch_quant import needs_bf16_cast

    if precision.key != "bf16" or spec.format != ModelFormat.HF:
        return precision.label
    if spec.stored_quantized:
        return f"source as stored ({spec.stored_dtype}, quantized)"
    return f"BF16 (cast from {spec.stored_dtype.upper()})" if needs_bf16_cast(spec) else precision.label


def _engine_version(precision: Precision) -> str:
    """What decides which engine serves the artifact and how, beyond library_versions(): llama.cpp's build (its
    CPU features and whether it offloads to a GPU: a CPU and a CUDA build share a version number); vLLM's own
    version, where it comes from, and whether every format is forced through it (QEXPLORER_VLLM_TRY_ALL)."""
    if precision.engine == Engine.LLAMA_CPP:
        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode(errors="replace")
        return f"llama.cpp gpu_offload={llama_cpp.llama_supports_gpu_offload()} {info}"
    from qexplorer.core.engines.vllm import find_vllm, installed_version

    command = find_vllm()
    if command is None:
        return "vllm absent"
    return (f"{installed_version(command)} from {command.source} ({command.argv[0]}); "
            f"try_all={bool(os.environ.get('QEXPLORER_VLLM_TRY_ALL'))}")


def _context(spec: ModelSpec, precision: Precision, job: JobSpec, artifact: Path, reference: Any,
             cancel: threading.Event | None) -> EngineContext:
    from qexplorer.core.device import local_device

    device = local_device(use_cuda=not precision.is_gguf)  # QEXPLORER_SIMULATE_DEVICE: a simulated GPU, labelled
    cuda = device.cuda and not precision.is_gguf
    gpu_name = device.name if cuda else None
    support = precision.support(Hardware(cuda=cuda, compute_capability=device.compute_capability))
    return EngineContext(spec=spec, precision=precision, job=job, artifact=artifact,
                         artifact_weight_bytes=weight_file_bytes(artifact),
                         reference=reference, support_mode=support.mode,
                         device="cuda" if cuda and not device.simulated else "cpu", target=device,
                         gpu_name=gpu_name, bench_text=_bench_text(), cancel=cancel)


def before_unified_load(unified: Callable[[], bool] | None = None,
                        drop: Callable[[], CacheDrop] | None = None) -> Step[None]:
    """On unified memory (GB10), drop the page cache before an engine (vLLM, llama.cpp, transformers) loads the
    artifact, and say in the log whether it was dropped (:mod:`qexplorer.core.pagecache`). Elsewhere nothing:
    a discrete card's weights do not come out of the host's free pages. ``unified`` and ``drop`` are test seams."""
    from qexplorer.core.telemetry import unified_memory_here

    if not (unified or unified_memory_here)():
        return
    result = (drop or drop_page_cache)()
    yield Log(result.message, level="info" if result.dropped else "warning")


def _measure(ctx: EngineContext) -> Step[Measured]:
    """The engine that serves the artifact; for Hugging Face formats the transformers fallback, labelled, where
    vLLM is absent or cannot run the format here (its reason in one sentence).

    A vLLM artifact's own quality pass (transformers, from the served folder) runs first: it is untimed
    preparation, so in a queue it overlaps another job's measurements (jobs.overlap), and the fallback reuses
    it rather than running it twice."""
    from qexplorer.core.engines import llamacpp, transformers, vllm

    if ctx.precision.engine == Engine.LLAMA_CPP:
        return (yield from llamacpp.measure(ctx))
    quality = None
    if ctx.reference is not None and vllm.cannot_run_reason(ctx) is None:
        try:
            quality = yield from transformers.artifact_quality(ctx)
        except (RuntimeError, ValueError, OSError, KeyError) as exc:
            # vLLM will serve and measure it; transformers cannot load this folder (seen: a W8A8 Qwen3-MoE whose
            # fused experts transformers 5 could not convert). Say why; vLLM's log-prob figures will stand.
            yield Log(f"the artifact's own quality pass could not load it in transformers "
                      f"({type(exc).__name__}: {str(exc)[:200]}); vLLM's log-prob figures will stand", level="warning")
        transformers.release_memory()  # before vLLM loads the same weights
    try:
        measured = yield from vllm.measure(ctx)
    except vllm.VllmCannotRun as exc:
        reason = str(exc)
        yield Log(f"{ctx.precision.label}: {reason}; measuring it with {transformers.FALLBACK_LABEL} instead",
                  level="warning")
        return (yield from transformers.measure(ctx, fallback_reason=reason, quality=quality))
    if quality is not None and measured.engine.mode == SupportMode.WEIGHT_ONLY:
        yield Log(f"{ctx.precision.label}: vLLM serves it weight-only here ({measured.engine.kernel}): its "
                  "activations are not quantized, while the artifact's KLD / top-1 / PPL were measured in "
                  "transformers with them quantized; vLLM's own log-prob KLD is the served numerics", level="warning")
    if quality is not None:
        # the worker's own GPU peak is the quality pass's (vLLM's memory is its server's, sampled from outside)
        measured = replace(measured, quality=quality[0], quality_s=quality[1],
                           memory=replace(measured.memory, **transformers.torch_cuda_peaks()))
    return measured


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _bench_text() -> str:
    from qexplorer.core.quantize.torch_quant import CALIBRATION_FILE

    return CALIBRATION_FILE.read_text(encoding="utf-8")


def _hardware(gpu_name: str | None, data_dir: Path, threads: int) -> HardwareFacts:
    """The machine, and the bandwidth bound of the device that decoded: a published figure for a known GPU
    (GB10 273 GB/s), else this host's copy bandwidth on the benchmark's thread count."""
    from qexplorer.core.bench.bandwidth import host_bandwidth, published_bandwidth

    if gpu_name and published_bandwidth(gpu_name):
        bandwidth, source = published_bandwidth(gpu_name), f"published ({gpu_name})"
    else:
        bandwidth, source = host_bandwidth(data_dir / "host-bandwidth.json", cpu_name(), threads)
    return HardwareFacts(cpu=cpu_name(), cores=os.cpu_count(), gpu=gpu_name, machine=platform.machine(),
                         bandwidth_bytes_s=bandwidth, bandwidth_source=source)
