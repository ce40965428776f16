"""Exports a server loads: a GGUF file for llama.cpp, a folder for vLLM.

* GGUF precisions: the quantized file (made if missing), copied to ``out``.
* fp8 / int8 / int4_rtn / gptq / awq: a compressed-tensors folder written by
  llm-compressor (FP8_DYNAMIC, W8A16, W4A16 RTN / GPTQ / AWQ), which
  ``vllm serve`` loads as it is.
* bf16 / fp16 / fp32: a plain Hugging Face checkpoint in that dtype.

Everything is written under a ``.partial`` name and renamed when complete, so a
crash or a full disk never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator
from pathlib import Path

from qexplorer.core.errors import UserError
from qexplorer.core.jobs.events import JobEvent, Phase
from qexplorer.core.jobs.record import ExportRecord
from qexplorer.core.kinds import ModelFormat, Producer
from qexplorer.core.model import ModelSpec
from qexplorer.core.precisions import Precision


def serve_command(precision: Precision, out: Path) -> str:
    if precision.is_gguf:
        return f"llama-server -m {out} --port 8080    # or: python -m llama_cpp.server --model {out}"
    return f"vllm serve {out}"


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _finish(partial: Path, out: Path) -> None:
    if out.exists():
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    os.replace(partial, out)


def _copy_file(source: Path, out: Path) -> None:
    partial = _partial(out)
    try:
        shutil.copyfile(source, partial)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise UserError(f"Could not write {out} ({exc.strerror or exc}); nothing was left under that name.") from None
    _finish(partial, out)


def export_model(spec: ModelSpec, precision: Precision, out: Path, work_dir: Path,
                 threads: int = 0) -> Generator[JobEvent, None, ExportRecord]:
    """Yields events; returns what was written and how to serve it."""
    out = out.expanduser().resolve()
    if not out.parent.exists():
        raise UserError(f"The folder {out.parent} does not exist; create it or choose another --out.")
    if precision.is_gguf:
        from qexplorer.core.quantize.gguf_quant import gguf_for

        bf16_folder = None
        if spec.format == ModelFormat.HF:
            from qexplorer.core.quantize.torch_quant import bf16_checkpoint

            bf16_folder = yield from bf16_checkpoint(spec, work_dir)
        artifact = work_dir / f"{precision.key}.gguf"
        if not artifact.exists():
            artifact = yield from gguf_for(spec, precision, work_dir, bf16_folder, threads)
        yield Phase("export", f"writing {out.name}")
        _copy_file(artifact, out)
        fmt = "gguf"
    else:
        yield from _export_torch(spec, precision, out, work_dir)
        fmt = "hf" if not precision.quantized else "compressed-tensors"
    size = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return ExportRecord(export_path=str(out), format=fmt, bytes=size, serve_command=serve_command(precision, out))


def _export_torch(spec: ModelSpec, precision: Precision, out: Path, work_dir: Path) -> Generator[JobEvent, None, None]:
    from qexplorer.core.quantize import torch_quant

    torch_quant.quiet_libraries()
    source = yield from torch_quant.bf16_checkpoint(spec, work_dir)
    partial = _partial(out)
    shutil.rmtree(partial, ignore_errors=True)
    yield Phase("export", f"writing {precision.label} to {out.name}")
    try:
        if not precision.quantized:
            model, tokenizer = torch_quant.load_model(source, precision.key)
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
        elif precision.export_scheme is not None:
            yield from torch_quant.llmcompressor_scheme(source, partial, precision.export_scheme)
        elif Producer.LLMCOMPRESSOR in (precision.producer, precision.cpu_producer):
            cached = work_dir / f"{precision.key}-compressed-tensors"
            if cached.exists():
                shutil.copytree(cached, partial)
            else:
                yield from torch_quant.llmcompressor_quantize(source, partial, precision, spec)
        else:
            raise UserError(f"{precision.label} has no servable export format.")
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"Could not write {out} ({exc.strerror or exc}); nothing was left under that name.") from None
    _finish(partial, out)
