"""Exports a server loads: the very artifact that was measured, hard-linked where it can be, else copied.

* GGUF precisions: the ``.gguf`` file, for ``llama-server -m``.
* Hugging Face precisions: the folder - a compressed-tensors folder made by
  llm-compressor (FP8_DYNAMIC, W8A8, W4A16 RTN / GPTQ / AWQ, NVFP4A16, NVFP4),
  or a plain checkpoint for BF16 / FP16 / FP32 - for ``vllm serve``.

The artifact is made if no job has made it yet (the same producer as a run), so
its content hash equals the ``artifact_sha256`` of the run that measured it; the
export record carries the hash of what it wrote. Everything is written under a
``.partial`` name and renamed when complete, so a crash or a full disk never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator
from pathlib import Path

from qexplorer.core.artifacts import content_sha256
from qexplorer.core.domain.events import JobEvent, Phase
from qexplorer.core.domain.phases import PhaseKind
from qexplorer.core.domain.record import ExportRecord
from qexplorer.core.errors import UserError
from qexplorer.core.model import ModelSpec
from qexplorer.core.precisions import Precision
from qexplorer.core.quantize.artifact import produce


def serve_command(precision: Precision, out: Path) -> str:
    if precision.is_gguf:
        return f"llama-server -m {out} --port 8080    # or: python -m llama_cpp.server --model {out}"
    return f"vllm serve {out}"


WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    """A weight file is hard-linked where the export lands on the artifact's file system (a 60 GB folder in no
    time and no space: qexplorer never rewrites an artifact in place - every producer writes a ``.partial`` and
    renames it), else copied; the small files around it (config, tokenizer) are always copied, so editing the
    export's config never edits the measured artifact."""
    if str(src).endswith(WEIGHT_SUFFIXES):
        Path(dst).unlink(missing_ok=True)  # a leftover .partial would make the link fail
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system (EXDEV), or links not allowed: copy
            pass
    shutil.copyfile(src, dst)


def _copy(src: str | Path, dst: str | Path) -> None:
    shutil.copyfile(src, dst)


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _finish(partial: Path, out: Path) -> None:
    if out.exists():
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    os.replace(partial, out)


def export_model(spec: ModelSpec, precision: Precision, out: Path, work_dir: Path,
                 threads: int = 0) -> Generator[JobEvent, None, ExportRecord]:
    """Yields events; returns what was written, its hash and how to serve it."""
    out = out.expanduser().resolve()
    if not out.parent.exists():
        raise UserError(f"The folder {out.parent} does not exist; create it or choose another --out.")
    artifact = yield from produce(spec, precision, work_dir, threads)
    yield Phase(PhaseKind.EXPORT, f"writing {out.name}")
    partial = _partial(out)
    # only qexplorer's own artifacts are linked: the user's own folder (a BF16 checkpoint served as it is) may be
    # rewritten in place by whoever owns it
    place = _link_or_copy if artifact.resolve().is_relative_to(work_dir.resolve()) else _copy
    try:
        if artifact.is_file():
            place(artifact, partial)
        else:
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(artifact, partial, copy_function=place)
    except OSError as exc:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        raise UserError(f"Could not write {out} ({exc.strerror or exc}); nothing was left under that name.") from None
    sha256 = content_sha256(partial)  # what was written, hashed before it gets the final name
    _finish(partial, out)
    fmt = "gguf" if precision.is_gguf else ("compressed-tensors" if precision.quantized else "hf")
    size = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return ExportRecord(export_path=str(out), format=fmt, bytes=size, serve_command=serve_command(precision, out),
                        sha256=sha256)
