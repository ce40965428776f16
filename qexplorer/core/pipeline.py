"""One job = one model × one precision: prepare, quantize, load, benchmark.

:func:`run_job` is a generator of :class:`~qexplorer.core.events.Event` and
runs inside the worker process (``python -m qexplorer.worker``), never in the
UI process. It checks ``cancel`` between steps. Everything it measures goes
into the final ``result`` event; the parent adds what only it can see (peak
memory from outside, the guard) and stores the record.
"""

from __future__ import annotations

import hashlib
import os
import platform
import resource
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from qexplorer import __version__
from qexplorer.core import events
from qexplorer.core.bench import BenchConfig, roofline_pct
from qexplorer.core.catalog import Catalog, ModelSpec
from qexplorer.core.errors import UserError
from qexplorer.core.precisions import Precision, get

CALIBRATE_PHASE = "calibrate"
LIBRARIES = ("torch", "transformers", "torchao", "llmcompressor", "llama_cpp_python", "textual")


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs; crosses the process boundary as JSON."""

    model_ref: str
    precision: str
    data_dir: str
    bench: BenchConfig = field(default_factory=BenchConfig)
    model_paths: tuple[str, ...] = ()
    quality: bool = False
    quality_corpus: str | None = None  # a text file or folder; None: the default corpus
    quality_tokens: int = 4096
    quality_ctx: int = 512
    reference_precision: str = "bf16"
    top_k: int = 256
    phase_timeout_s: float = 1800.0
    planned_peak_bytes: int | None = None
    planned_total_bytes: int | None = None
    model_name: str = ""  # filled by the parent for failure records
    model_path: str = ""
    action: str = "run"  # "run" (quantize + benchmark [+ quality]) or "export"
    trust_remote_code: bool = False
    export_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> JobSpec:
        data = dict(data)
        data["bench"] = BenchConfig(**data.get("bench", {}))
        data["model_paths"] = tuple(data.get("model_paths", ()))
        return JobSpec(**data)


def model_key(spec: ModelSpec) -> str:
    """A folder name for a model's artifacts: readable, and unique per file."""
    path = Path(spec.path)
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:10]
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in spec.name)[:60]
    return f"{safe}-{digest}"


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


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise events.Cancelled()


def run_job(job: JobSpec, cancel: threading.Event | None = None) -> Iterator[events.Event]:
    """The whole job for one precision, as events; ends with ``result`` or raises."""
    precision = get(job.precision)
    spec = Catalog(extra_paths=job.model_paths, include_hf_cache=True, include_app_dirs=False).resolve(job.model_ref)
    from qexplorer.core.quantize import torch_quant
    from qexplorer.core.safety import check_loadable

    # the parent checked already; the worker checks again because it is the one that loads
    check_loadable(spec, trust_remote_code=job.trust_remote_code, allow_pickle=True)
    torch_quant.TRUST_REMOTE_CODE = job.trust_remote_code
    work_dir = Path(job.data_dir) / "artifacts" / model_key(spec)
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    yield events.log(f"{spec.name} → {precision.label}; artifacts in {work_dir}")
    if job.action == "export":
        from qexplorer.core.export import export_model

        if not job.export_path:
            raise UserError("An export needs an output path (--out).")
        for item in export_model(spec, precision, Path(job.export_path), work_dir, job.bench.threads):
            if isinstance(item, dict):
                yield events.result({"model_name": spec.name, "model_path": spec.path, "precision": precision.key,
                                     "family": precision.family, **item})
            else:
                yield item
                _check(cancel)
        return
    record: dict[str, Any] = {
        "model_name": spec.name, "model_path": spec.path, "model_ref": job.model_ref,
        "model_params": spec.total_params, "model_stored_dtype": spec.stored_dtype,
        "reference_quantized": spec.stored_quantized,
        "precision": precision.key, "precision_label": precision.label, "family": precision.family,
        "bench_config": asdict(job.bench), "versions": library_versions(),
        "planned_peak_bytes": job.planned_peak_bytes, "planned_total_bytes": job.planned_total_bytes,
        "baseline_rss_bytes": current_rss_bytes(),
    }
    reference = None
    if job.quality:
        reference = yield from _ensure_reference(spec, job, work_dir, cancel)
    if precision.is_gguf:
        yield from _gguf_job(spec, precision, job, work_dir, record, cancel, reference)
    else:
        yield from _torch_job(spec, precision, job, work_dir, record, cancel, reference)
    record["peak_rss_bytes"] = peak_rss_bytes()
    # Bandwidth for the roofline is measured after the peak is recorded (its buffers
    # would count), in a phase the parent leaves out of its own peak.
    yield events.phase(CALIBRATE_PHASE, "memory bandwidth for the roofline")
    record["hardware"] = _hardware(record.pop("gpu_name", None), Path(job.data_dir))
    _roofline(record)
    yield events.result(record)


def _take_path(gen: Iterator[events.Event | Path], sink: list[Path]) -> Iterator[events.Event]:
    for item in gen:
        if isinstance(item, Path):
            sink.append(item)
        else:
            yield item


def _gguf_job(spec: ModelSpec, precision: Precision, job: JobSpec, work_dir: Path, record: dict[str, Any],
              cancel: threading.Event | None, reference: Any = None) -> Iterator[events.Event]:
    import llama_cpp

    from qexplorer.core.bench import llamacpp
    from qexplorer.core.quantize.gguf_quant import gguf_for

    bf16_folder = None
    if spec.format == "hf":
        from qexplorer.core.quantize.torch_quant import bf16_checkpoint

        folders: list[Path] = []
        yield from _take_path(bf16_checkpoint(spec, work_dir), folders)
        bf16_folder = folders[0]
    _check(cancel)
    started = time.perf_counter()
    outputs: list[Path] = []
    yield from _take_path(gguf_for(spec, precision, work_dir, bf16_folder, job.bench.threads), outputs)
    record["quantize_s"] = time.perf_counter() - started
    gguf_path = outputs[0]
    _check(cancel)
    yield events.phase("load", f"loading {gguf_path.name} with llama.cpp")
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    started = time.perf_counter()
    llm = llamacpp.load(gguf_path, job.bench, n_gpu_layers=-1 if gpu else 0)
    record["load_s"] = time.perf_counter() - started
    record["loaded_rss_bytes"] = current_rss_bytes()
    from qexplorer.core.gguf_header import read_gguf_header

    weight_bytes = sum(t.n_bytes for t in read_gguf_header(gguf_path).tensors)
    record.update(backend="llama.cpp", mode="native", artifact_path=str(gguf_path),
                  weight_bytes=weight_bytes, resident_weight_bytes=weight_bytes,
                  artifact_bytes=gguf_path.stat().st_size, device="cuda" if gpu else "cpu")
    record["gpu_name"] = "CUDA (llama.cpp offload)" if gpu else None
    _check(cancel)
    yield events.phase("benchmark", f"pp{job.bench.prompt_tokens} / tg{job.bench.gen_tokens} × {job.bench.repetitions}")
    text = _bench_text()
    outcome = yield from _outcome(llamacpp.run(llm, text, job.bench), cancel)
    record.update(outcome)
    record["bytes_per_token"] = weight_bytes
    if reference is not None:
        del llm  # the quality pass needs every position's logits: a second context
        yield events.phase("quality", "KLD, top-1 and perplexity against the reference")
        qllm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=job.quality_ctx, n_batch=job.quality_ctx,
                               n_ubatch=job.quality_ctx, n_threads=job.bench.threads or (os.cpu_count() or 1),
                               n_gpu_layers=-1 if gpu else 0, logits_all=True, verbose=False)
        from qexplorer.core import quality

        meta = reference[0]
        probe = qllm.tokenize(meta.probe_text.encode(), add_bos=False, special=False)
        quality.check_alignment(meta, probe, qllm.n_vocab())
        record["quality"] = yield from _quality(reference, quality.llamacpp_logits_fn(qllm), cancel)


def _torch_job(spec: ModelSpec, precision: Precision, job: JobSpec, work_dir: Path, record: dict[str, Any],
               cancel: threading.Event | None, reference: Any = None) -> Iterator[events.Event]:
    from qexplorer.core.quantize.torch_quant import quiet_libraries

    quiet_libraries()
    import torch

    from qexplorer.core.bench import torch_backend
    from qexplorer.core.quantize import torch_quant

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    cc = torch.cuda.get_device_capability(0) if cuda else None
    folders: list[Path] = []
    yield from _take_path(torch_quant.bf16_checkpoint(spec, work_dir), folders)
    source = folders[0]
    _check(cancel)
    uses_llmcompressor = precision.key in ("gptq", "awq") or (precision.key == "int4_rtn" and not cuda)
    started = time.perf_counter()
    artifact = None
    if uses_llmcompressor:
        artifact = work_dir / f"{precision.key}-compressed-tensors"
        yield events.phase("quantize", precision.method)
        yield from torch_quant.llmcompressor_quantize(source, artifact, precision, spec)
        record["quantize_s"] = time.perf_counter() - started
        _check(cancel)
        yield events.phase("load", "loading the compressed-tensors checkpoint")
        started = time.perf_counter()
        model, tokenizer = torch_quant.load_model(artifact, "bf16", device)
        record["load_s"] = time.perf_counter() - started
        mode = "emulated" if not cuda else "native"
        record["artifact_bytes"] = sum(p.stat().st_size for p in artifact.glob("*.safetensors"))
        record["weight_bytes"] = record["artifact_bytes"]
    else:
        yield events.phase("load", f"loading {source.name} as {DTYPE_LABEL.get(precision.key, 'bf16')}")
        started = time.perf_counter()
        dtype = precision.key if precision.key in torch_quant.DTYPES else "bf16"
        model, tokenizer = torch_quant.load_model(source, dtype, device)
        record["load_s"] = time.perf_counter() - started
        mode = "native"
        if precision.quantized:
            _check(cancel)
            yield events.phase("quantize", precision.method)
            started = time.perf_counter()
            mode = torch_quant.torchao_quantize(model, precision, spec, cc)
            record["quantize_s"] = time.perf_counter() - started
        record["weight_bytes"] = torch_quant.model_weight_bytes(model)
    record["resident_weight_bytes"] = torch_quant.model_weight_bytes(model)
    record["loaded_rss_bytes"] = current_rss_bytes()
    record.update(backend="transformers", mode=mode, device=device,
                  artifact_path=str(artifact) if artifact else None)
    record["gpu_name"] = torch.cuda.get_device_name(0) if cuda else None
    if mode == "emulated":
        yield events.log(f"{precision.label} runs emulated here: {precision.support(_hw(cuda, cc)).note}",
                         level="warning")
    _check(cancel)
    yield events.phase("benchmark", f"pp{job.bench.prompt_tokens} / tg{job.bench.gen_tokens} × {job.bench.repetitions}")
    outcome = yield from _outcome(torch_backend.run(model, tokenizer, _bench_text(), job.bench), cancel)
    record.update(outcome)
    record["bytes_per_token"] = record["resident_weight_bytes"]
    if reference is not None:
        from qexplorer.core import quality

        yield events.phase("quality", "KLD, top-1 and perplexity against the reference")
        probe = tokenizer(reference[0].probe_text, add_special_tokens=False)["input_ids"]
        quality.check_alignment(reference[0], probe, int(model.config.vocab_size))
        record["quality"] = yield from _quality(reference, quality.torch_logits_fn(model), cancel)


DTYPE_LABEL = {"fp32": "fp32", "fp16": "fp16"}


def job_corpus(job: JobSpec):
    from qexplorer.core import quality

    if job.quality_corpus:
        return quality.load_corpus(Path(job.quality_corpus))
    # ~6 characters per token leaves room for prose and code alike; the tokens are cut to size after
    return quality.default_corpus(chars=job.quality_tokens * 6)


def _ensure_reference(spec: ModelSpec, job: JobSpec, work_dir: Path,
                      cancel: threading.Event | None) -> Iterator[events.Event]:
    """The reference log-probs for this model + corpus: from the cache, or computed now (once)."""
    from qexplorer.core import quality
    from qexplorer.core.quantize import torch_quant

    corpus = job_corpus(job)
    folder = quality.reference_dir(Path(job.data_dir), model_key(spec), corpus, job.reference_precision,
                                   job.quality_ctx, job.quality_tokens, job.top_k)
    cached = quality.load_reference(folder)
    if cached is not None:
        yield events.log(f"reusing the {job.reference_precision} reference for {corpus.name} ({folder.name})")
        return cached
    yield events.phase("reference", f"{job.reference_precision} reference log-probs on {corpus.name} (once)")
    torch_quant.quiet_libraries()
    folders: list[Path] = []
    yield from _take_path(torch_quant.bf16_checkpoint(spec, work_dir), folders)
    model, tokenizer = torch_quant.load_model(folders[0], job.reference_precision)
    ids = tokenizer(corpus.text, add_special_tokens=False)["input_ids"][: job.quality_tokens]
    bos = tokenizer.bos_token_id if _adds_bos(spec, tokenizer) else None
    chunks = quality.make_chunks(ids, job.quality_ctx, bos)
    meta = quality.ReferenceMeta(
        format=quality.REFERENCE_FORMAT, model_path=spec.path, reference_precision=job.reference_precision,
        corpus_name=corpus.name, corpus_sha256=corpus.sha256, n_tokens=len(chunks) * job.quality_ctx,
        ctx=job.quality_ctx, n_chunks=len(chunks), top_k=job.top_k, bos_id=bos,
        vocab_size=int(model.config.vocab_size),
        probe_text=quality.probe_text(corpus),
        probe_ids=tokenizer(quality.probe_text(corpus), add_special_tokens=False)["input_ids"],
        reference_quantized=spec.stored_quantized,
    )
    for event in quality.build_reference(folder, quality.torch_logits_fn(model), chunks, meta):
        yield event
        _check(cancel)
    del model
    import gc

    gc.collect()
    loaded = quality.load_reference(folder)
    assert loaded is not None
    return loaded


def _adds_bos(spec: ModelSpec, tokenizer: Any) -> bool:
    """Whether the model expects BOS: GGUF's tokenizer.ggml.add_bos_token, else the tokenizer's own flag."""
    if spec.format == "gguf":
        from qexplorer.core.gguf_header import read_gguf_header

        value = read_gguf_header(Path(spec.path)).metadata.get("tokenizer.ggml.add_bos_token")
        if isinstance(value, bool):
            return value
    return bool(getattr(tokenizer, "add_bos_token", False)) and tokenizer.bos_token_id is not None


def _quality(reference: Any, logits_fn: Any, cancel: threading.Event | None) -> Iterator[events.Event]:
    from qexplorer.core import quality

    meta = reference[0]
    stats: dict[str, Any] = {}
    started = time.perf_counter()
    for item in quality.candidate_pass(reference, logits_fn):
        if isinstance(item, dict):
            stats = item
        else:
            yield item
            _check(cancel)
    folder_bytes = sum(arr.nbytes for arr in reference[1].values())
    stats.update(corpus=meta.corpus_name, corpus_sha256=meta.corpus_sha256, n_tokens=meta.n_tokens,
                 ctx=meta.ctx, n_chunks=meta.n_chunks, top_k=meta.top_k,
                 chunking=f"{meta.n_chunks} chunks of {meta.ctx} tokens, BOS first, second half scored",
                 reference_precision=meta.reference_precision, reference_quantized=meta.reference_quantized,
                 reference_cache_bytes=int(folder_bytes), quality_s=time.perf_counter() - started,
                 quality_peak_rss_bytes=peak_rss_bytes())
    return stats


def _hw(cuda: bool, cc: tuple[int, int] | None):
    from qexplorer.core.precisions import Hardware

    return Hardware(cuda=cuda, compute_capability=cc)


def _outcome(gen: Iterator[Any], cancel: threading.Event | None) -> Iterator[events.Event]:
    outcome: dict[str, Any] = {}
    for item in gen:
        if isinstance(item, dict):
            outcome = item
        else:
            yield item
            _check(cancel)
    return outcome


def _bench_text() -> str:
    from qexplorer.core.quantize.torch_quant import CALIBRATION_FILE

    return CALIBRATION_FILE.read_text(encoding="utf-8")


def _hardware(gpu_name: str | None, data_dir: Path) -> dict[str, Any]:
    from qexplorer.core.bench.bandwidth import host_bandwidth, published_bandwidth

    if gpu_name and published_bandwidth(gpu_name):
        bandwidth, source = published_bandwidth(gpu_name), "published"
    else:
        bandwidth, source = host_bandwidth(data_dir / "host-bandwidth.json", cpu_name())
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "gpu": gpu_name, "machine": platform.machine(),
            "bandwidth_bytes_s": bandwidth, "bandwidth_source": source}


def _roofline(record: dict[str, Any]) -> None:
    """Decode as % of the bandwidth bound: bandwidth ÷ bytes read per token (the weights)."""
    decode = (record.get("decode_tok_s") or {}).get("mean")
    bandwidth = record.get("hardware", {}).get("bandwidth_bytes_s")
    if decode and record.get("bytes_per_token"):
        record["roofline_pct"] = roofline_pct(decode, record["bytes_per_token"], bandwidth)
