"""GGUF precisions with llama.cpp's own tools.

* Hugging Face folder → BF16 GGUF with ``convert-hf-to-gguf`` (run as a child
  process with an argument list, never a shell string);
* GGUF → Q8_0 … Q2_K with llama.cpp's quantizer through ``llama-cpp-python``
  (``llama_model_quantize``). Re-quantizing an already quantized file is
  allowed, with a warning: quality is bounded by the source's grid.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from pathlib import Path

from qexplorer.core.artifacts import file_lock
from qexplorer.core.errors import UserError
from qexplorer.core.jobs.events import JobEvent, Log, Metric, Phase
from qexplorer.core.kinds import ModelFormat
from qexplorer.core.model import ModelSpec
from qexplorer.core.precisions import Precision


def llama_ftype(name: str) -> int:
    from gguf.constants import LlamaFileType

    return int(LlamaFileType[f"MOSTLY_{name.upper()}"])


def hf_to_gguf(folder: Path, out: Path, outtype: str = "bf16") -> Iterator[JobEvent]:
    """Convert a Hugging Face folder to a GGUF file with convert-hf-to-gguf."""
    exe = shutil.which("convert-hf-to-gguf", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        raise RuntimeError("convert-hf-to-gguf is not installed; run scripts/setup.sh.")
    partial = out.with_name(out.name + ".partial")
    started = time.perf_counter()
    done = subprocess.run([exe, "--outtype", outtype, "--outfile", str(partial), str(folder)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0 or not partial.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"convert-hf-to-gguf failed: {tail[0]}")
    problem = tokenizer_mismatch(folder, partial)
    if problem:
        partial.unlink(missing_ok=True)
        raise UserError(problem)
    os.replace(partial, out)
    yield Metric("convert_s", time.perf_counter() - started, "s")


def tokenizer_mismatch(folder: Path, gguf: Path) -> str | None:
    """convert-hf-to-gguf 0.1.1 can write a SentencePiece vocabulary for a BPE tokenizer; llama.cpp then
    aborts on the first tokenize (seen with SmolLM2). Caught here as one sentence instead of a crash."""
    import json

    from qexplorer.core.gguf_header import read_gguf_header

    try:
        hf_type = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["type"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    gguf_model = read_gguf_header(gguf).metadata.get("tokenizer.ggml.model")
    expected = {"BPE": "gpt2", "Unigram": "llama"}.get(hf_type)
    if expected and gguf_model != expected:
        return (f"convert-hf-to-gguf wrote a {gguf_model!r} vocabulary for this {hf_type} tokenizer, which llama.cpp "
                "cannot tokenize with; convert the model with llama.cpp's own convert_hf_to_gguf.py and pass the "
                "GGUF file instead.")
    return None


def quantize_gguf(source: Path, out: Path, precision: Precision, threads: int = 0) -> Iterator[JobEvent]:
    """llama.cpp's quantizer; writes to a temporary name and renames when complete."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype(precision.gguf_type or precision.key)
    params.nthread = threads or (os.cpu_count() or 1)
    params.allow_requantize = True
    partial = out.with_name(out.name + ".partial")
    started = time.perf_counter()
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    if code != 0 or not partial.exists():
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp's quantizer failed on {source.name} (code {code}).")
    os.replace(partial, out)
    yield Metric("quantize_s", time.perf_counter() - started, "s")


def gguf_for(spec: ModelSpec, precision: Precision, work_dir: Path, bf16_folder: Path | None,
             threads: int = 0) -> Generator[JobEvent, None, Path]:
    """The GGUF file for ``precision``: quantized from the model's GGUF, or from its HF folder."""
    out = work_dir / f"{precision.key}.gguf"
    if spec.format == ModelFormat.GGUF:
        source = Path(spec.path)
        if spec.stored_quantized:
            yield Log(
                f"re-quantizing an already quantized file ({spec.stored_dtype} → {precision.gguf_type}): "
                f"quality cannot exceed the {spec.stored_dtype} source", level="warning")
    else:
        assert bf16_folder is not None
        source = work_dir / "bf16.gguf"
        with file_lock(source.with_name(source.name + ".lock")):
            if not source.exists():
                yield Phase("convert", "converting the checkpoint to a BF16 GGUF (convert-hf-to-gguf)")
                yield from hf_to_gguf(bf16_folder, source)
    yield Phase("quantize", f"llama.cpp quantize → {precision.gguf_type}")
    with file_lock(out.with_name(out.name + ".lock")):
        yield from quantize_gguf(source, out, precision, threads)
    return out
