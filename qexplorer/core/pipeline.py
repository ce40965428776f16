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
    phase_timeout_s: float = 1800.0
    planned_peak_bytes: int | None = None
    planned_total_bytes: int | None = None
    model_name: str = ""  # filled by the parent for failure records
    model_path: str = ""

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
    work_dir = Path(job.data_dir) / "artifacts" / model_key(spec)
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    yield events.log(f"{spec.name} → {precision.label}; artifacts in {work_dir}")
    record: dict[str, Any] = {
        "model_name": spec.name, "model_path": spec.path, "model_ref": job.model_ref,
        "model_params": spec.total_params, "model_stored_dtype": spec.stored_dtype,
        "reference_quantized": spec.stored_quantized,
        "precision": precision.key, "precision_label": precision.label, "family": precision.family,
        "bench_config": asdict(job.bench), "versions": library_versions(),
        "planned_peak_bytes": job.planned_peak_bytes, "planned_total_bytes": job.planned_total_bytes,
        "baseline_rss_bytes": current_rss_bytes(),
    }
    if precision.is_gguf:
        yield from _gguf_job(spec, precision, job, work_dir, record, cancel)
    else:
        yield from _torch_job(spec, precision, job, work_dir, record, cancel)
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
              cancel: threading.Event | None) -> Iterator[events.Event]:
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


def _torch_job(spec: ModelSpec, precision: Precision, job: JobSpec, work_dir: Path, record: dict[str, Any],
               cancel: threading.Event | None) -> Iterator[events.Event]:
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
        yield events.phase("quantize", f"llm-compressor {precision.method}")
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
            yield events.phase("quantize", f"torchao {precision.method}")
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


DTYPE_LABEL = {"fp32": "fp32", "fp16": "fp16"}


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
