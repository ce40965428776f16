"""One job = one model × one precision: prepare, quantize, load, benchmark [, quality].

:func:`run_job` runs inside the worker process (``python -m qexplorer.worker``),
never in the UI process. It is a generator of job events
(:mod:`qexplorer.core.jobs.events`) that *returns* a
:class:`~qexplorer.core.jobs.record.RunRecord` (or, for an export, an
:class:`~qexplorer.core.jobs.record.ExportRecord`); every step below returns
what it made the same way (``speed = yield from backend.run(...)``). It checks
``cancel`` between steps. The parent adds what only it can see (peak memory
from outside, the guard) and stores the record.
"""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from qexplorer import __version__
from qexplorer.core.artifacts import file_lock, model_work_dir
from qexplorer.core.bench import roofline_pct
from qexplorer.core.catalog import Catalog
from qexplorer.core.errors import UserError
from qexplorer.core.jobs.events import Cancelled, JobEvent, Log, Metric, Phase
from qexplorer.core.jobs.record import (
    EngineInfo,
    ExportRecord,
    HardwareFacts,
    MemoryFigures,
    ModelIdentity,
    QualityStats,
    ReferenceInfo,
    RunRecord,
    Speed,
    Timings,
)
from qexplorer.core.jobs.runner import CALIBRATE_PHASE
from qexplorer.core.jobs.spec import JobSpec
from qexplorer.core.kinds import Engine, JobAction, ModelFormat, Producer, SupportMode
from qexplorer.core.model import ModelSpec
from qexplorer.core.precisions import Hardware, Precision, get

LIBRARIES = ("torch", "transformers", "torchao", "llmcompressor", "llama_cpp_python", "textual")
T = TypeVar("T")
Step = Generator[JobEvent, None, T]


@dataclass(frozen=True)
class Measured:
    """What the engine-specific half of a job hands back to :func:`run_job`."""

    engine: EngineInfo
    memory: MemoryFigures
    timings: Timings
    speed: Speed
    quality: QualityStats | None
    gpu_name: str | None


def library_versions() -> dict[str, str]:
    found = {"qexplorer": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return found


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_bytes() -> int:
    """This process's high-water RSS (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def checked(gen: Step[T], cancel: threading.Event | None) -> Step[T]:
    """Pass ``gen``'s events through, checking ``cancel`` after each one; return its value."""
    result: T
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            result = stop.value
            break
        yield event
        _check(cancel)
    return result


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled()


def run_job(job: JobSpec, cancel: threading.Event | None = None) -> Step[RunRecord | ExportRecord]:
    """The whole job for one precision, as events; returns its record or raises."""
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
    baseline_rss = current_rss_bytes()
    reference = None
    if job.quality:
        from qexplorer.core.reference import ensure_reference

        reference = yield from checked(ensure_reference(spec, job, work_dir), cancel)
    if precision.is_gguf:
        measured = yield from _gguf_job(spec, precision, job, work_dir, cancel, reference)
    else:
        measured = yield from _torch_job(spec, precision, job, work_dir, cancel, reference)
    memory = replace(measured.memory, baseline_rss_bytes=baseline_rss, peak_rss_bytes=peak_rss_bytes(),
                     planned_peak_bytes=job.planned_peak_bytes, planned_total_bytes=job.planned_total_bytes)
    # Bandwidth for the roofline is measured after the peak is recorded (its buffers
    # would count), in a phase the parent leaves out of its own peak.
    yield Phase(CALIBRATE_PHASE, "memory bandwidth for the roofline")
    hardware = _hardware(measured.gpu_name, Path(job.data_dir))
    roofline = None
    if memory.bytes_per_token:
        roofline = roofline_pct(measured.speed.decode_tok_s.mean, memory.bytes_per_token, hardware.bandwidth_bytes_s)
    return RunRecord(
        model=ModelIdentity(name=spec.name, path=spec.path, ref=job.model_ref, params=spec.total_params,
                            stored_dtype=spec.stored_dtype, stored_quantized=spec.stored_quantized),
        precision=precision.key, precision_label=precision.label, family=precision.family,
        engine=measured.engine, hardware=hardware, versions=library_versions(), bench=job.bench,
        memory=memory, timings=measured.timings, speed=measured.speed, roofline_pct=roofline,
        quality=measured.quality,
    )


def _speed_metrics(speed: Speed) -> Iterator[JobEvent]:
    yield Metric("decode_tok_s", speed.decode_tok_s.mean, "tok/s", speed.decode_tok_s.sd)
    yield Metric("prefill_tok_s", speed.prefill_tok_s.mean, "tok/s", speed.prefill_tok_s.sd)


def _gguf_job(spec: ModelSpec, precision: Precision, job: JobSpec, work_dir: Path,
              cancel: threading.Event | None, reference: Any = None) -> Step[Measured]:
    import llama_cpp

    from qexplorer.core.bench import llamacpp
    from qexplorer.core.gguf_header import read_gguf_header
    from qexplorer.core.quantize.gguf_quant import gguf_for

    bf16_folder = None
    if spec.format == ModelFormat.HF:
        from qexplorer.core.quantize.torch_quant import bf16_checkpoint

        bf16_folder = yield from checked(bf16_checkpoint(spec, work_dir), cancel)
    started = time.perf_counter()
    gguf_path = yield from checked(gguf_for(spec, precision, work_dir, bf16_folder, job.bench.threads), cancel)
    quantize_s = time.perf_counter() - started
    yield Phase("load", f"loading {gguf_path.name} with llama.cpp")
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    started = time.perf_counter()
    llm = llamacpp.load(gguf_path, job.bench, n_gpu_layers=-1 if gpu else 0)
    load_s = time.perf_counter() - started
    loaded_rss = current_rss_bytes()
    weight_bytes = sum(t.n_bytes for t in read_gguf_header(gguf_path).tensors)
    _check(cancel)
    yield Phase("benchmark", f"pp{job.bench.prompt_tokens} / tg{job.bench.gen_tokens} × {job.bench.repetitions}")
    speed = yield from checked(llamacpp.run(llm, _bench_text(), job.bench), cancel)
    yield from _speed_metrics(speed)
    quality, quality_s = None, None
    if reference is not None:
        del llm  # the quality pass needs every position's logits: a second context
        yield Phase("quality", "KLD, top-1 and perplexity against the reference")
        qllm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=job.quality_ctx, n_batch=job.quality_ctx,
                               n_ubatch=job.quality_ctx, n_threads=job.bench.threads or (os.cpu_count() or 1),
                               n_gpu_layers=-1 if gpu else 0, logits_all=True, verbose=False)
        from qexplorer.core import quality as quality_mod

        probe = qllm.tokenize(reference[0].probe_text.encode(), add_bos=False, special=False)
        quality_mod.check_alignment(reference[0], probe, qllm.n_vocab())
        quality, quality_s = yield from _quality(reference, quality_mod.llamacpp_logits_fn(qllm), cancel)
    return Measured(
        engine=EngineInfo(name=Engine.LLAMA_CPP, mode=SupportMode.NATIVE, device="cuda" if gpu else "cpu",
                          artifact_path=str(gguf_path), artifact_bytes=gguf_path.stat().st_size),
        memory=MemoryFigures(loaded_rss_bytes=loaded_rss, weight_bytes=weight_bytes,
                             resident_weight_bytes=weight_bytes, bytes_per_token=weight_bytes),
        timings=Timings(quantize_s=quantize_s, load_s=load_s, quality_s=quality_s),
        speed=speed, quality=quality, gpu_name="CUDA (llama.cpp offload)" if gpu else None,
    )


def _torch_job(spec: ModelSpec, precision: Precision, job: JobSpec, work_dir: Path,
               cancel: threading.Event | None, reference: Any = None) -> Step[Measured]:
    from qexplorer.core.quantize.torch_quant import quiet_libraries

    quiet_libraries()
    import torch

    from qexplorer.core.bench import torch_backend
    from qexplorer.core.quantize import torch_quant

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    cc = torch.cuda.get_device_capability(0) if cuda else None
    source = yield from checked(torch_quant.bf16_checkpoint(spec, work_dir), cancel)
    producer = precision.producer_on(cuda)
    quantize_s = None
    artifact = None
    started = time.perf_counter()
    if producer == Producer.LLMCOMPRESSOR:
        artifact = work_dir / f"{precision.key}-compressed-tensors"
        yield Phase("quantize", precision.method)
        with file_lock(artifact.with_name(artifact.name + ".lock")):
            yield from checked(torch_quant.llmcompressor_quantize(source, artifact, precision, spec), cancel)
        quantize_s = time.perf_counter() - started
        yield Phase("load", "loading the compressed-tensors checkpoint")
        started = time.perf_counter()
        model, tokenizer = torch_quant.load_model(artifact, "bf16", device)
        load_s = time.perf_counter() - started
        mode = SupportMode.NATIVE if cuda else SupportMode.EMULATED
        artifact_bytes = sum(p.stat().st_size for p in artifact.glob("*.safetensors"))
        weight_bytes = artifact_bytes
    else:
        dtype = precision.key if producer == Producer.CAST else "bf16"
        yield Phase("load", f"loading {source.name} as {dtype}")
        model, tokenizer = torch_quant.load_model(source, dtype, device)
        load_s = time.perf_counter() - started
        mode = SupportMode.NATIVE
        if producer == Producer.TORCHAO:
            _check(cancel)
            yield Phase("quantize", precision.method)
            started = time.perf_counter()
            mode = SupportMode(torch_quant.torchao_quantize(model, precision, spec, cc))
            quantize_s = time.perf_counter() - started
        artifact_bytes = None
        weight_bytes = torch_quant.model_weight_bytes(model)
    resident = torch_quant.model_weight_bytes(model)
    loaded_rss = current_rss_bytes()
    if mode == SupportMode.EMULATED:
        yield Log(f"{precision.label} runs emulated here: "
                  f"{precision.support(Hardware(cuda=cuda, compute_capability=cc)).note}", level="warning")
    _check(cancel)
    yield Phase("benchmark", f"pp{job.bench.prompt_tokens} / tg{job.bench.gen_tokens} × {job.bench.repetitions}")
    speed = yield from checked(torch_backend.run(model, tokenizer, _bench_text(), job.bench), cancel)
    yield from _speed_metrics(speed)
    quality, quality_s = None, None
    if reference is not None:
        from qexplorer.core import quality as quality_mod

        yield Phase("quality", "KLD, top-1 and perplexity against the reference")
        probe = tokenizer(reference[0].probe_text, add_special_tokens=False)["input_ids"]
        quality_mod.check_alignment(reference[0], probe, int(model.config.vocab_size))
        quality, quality_s = yield from _quality(reference, quality_mod.torch_logits_fn(model), cancel)
    return Measured(
        engine=EngineInfo(name=Engine.TRANSFORMERS, mode=mode, device=device,
                          artifact_path=str(artifact) if artifact else None, artifact_bytes=artifact_bytes),
        memory=MemoryFigures(loaded_rss_bytes=loaded_rss, weight_bytes=weight_bytes,
                             resident_weight_bytes=resident, bytes_per_token=resident),
        timings=Timings(quantize_s=quantize_s, load_s=load_s, quality_s=quality_s),
        speed=speed, quality=quality, gpu_name=torch.cuda.get_device_name(0) if cuda else None,
    )


def _quality(reference: Any, logits_fn: Any, cancel: threading.Event | None) -> Step[tuple[QualityStats, float]]:
    """The candidate pass against the reference; returns the statistics and the seconds it took."""
    from qexplorer.core import quality

    meta = reference[0]
    started = time.perf_counter()
    stats = yield from checked(quality.candidate_pass(reference, logits_fn), cancel)
    elapsed = time.perf_counter() - started
    folder_bytes = sum(arr.nbytes for arr in reference[1].values())
    stats = replace(stats, quality_peak_rss_bytes=peak_rss_bytes(), reference=ReferenceInfo(
        precision=meta.reference_precision, quantized=meta.reference_quantized, corpus=meta.corpus_name,
        corpus_sha256=meta.corpus_sha256, n_tokens=meta.n_tokens, ctx=meta.ctx, n_chunks=meta.n_chunks,
        top_k=meta.top_k, chunking=f"{meta.n_chunks} chunks of {meta.ctx} tokens, BOS first, second half scored",
        cache_bytes=int(folder_bytes)))
    yield Metric("kld_mean", stats.kld_mean, "", stats.kld_sd)
    yield Metric("same_top1_pct", stats.same_top1_pct, "%", stats.same_top1_se_pct)
    return stats, elapsed


def _bench_text() -> str:
    from qexplorer.core.quantize.torch_quant import CALIBRATION_FILE

    return CALIBRATION_FILE.read_text(encoding="utf-8")


def _hardware(gpu_name: str | None, data_dir: Path) -> HardwareFacts:
    from qexplorer.core.bench.bandwidth import host_bandwidth, published_bandwidth

    if gpu_name and published_bandwidth(gpu_name):
        bandwidth, source = published_bandwidth(gpu_name), "published"
    else:
        bandwidth, source = host_bandwidth(data_dir / "host-bandwidth.json", cpu_name())
    return HardwareFacts(cpu=cpu_name(), cores=os.cpu_count(), gpu=gpu_name, machine=platform.machine(),
                         bandwidth_bytes_s=bandwidth, bandwidth_source=source)
