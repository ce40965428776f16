"""One artifact per precision, and one producer each: the thing benchmark, quality and export all use.

* GGUF precisions: ``<key>.gguf`` from llama.cpp's quantizer (a Hugging Face model goes through llama.cpp's
  own converter to a BF16 GGUF first).
* Hugging Face precisions: a folder - the BF16 checkpoint, a cast of it, or a compressed-tensors folder from
  llm-compressor (:func:`qexplorer.core.quantize.torch_quant.produce_artifact`).

Made once per model file (under a lock) and reused by every later job and the export.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

from qexplorer.core.domain.events import JobEvent
from qexplorer.core.kinds import ModelFormat
from qexplorer.core.model import ModelSpec
from qexplorer.core.precisions import Precision


def produce(spec: ModelSpec, precision: Precision, work_dir: Path, threads: int = 0) -> Generator[JobEvent, None, Path]:
    """The artifact (made now, or found); torch_quant.TRUST_REMOTE_CODE is set once per worker by run_job."""
    if precision.is_gguf:
        from qexplorer.core.quantize.gguf_quant import gguf_for

        bf16_folder = None
        if spec.format == ModelFormat.HF:
            from qexplorer.core.quantize.torch_quant import bf16_checkpoint

            bf16_folder = yield from bf16_checkpoint(spec, work_dir)
        return (yield from gguf_for(spec, precision, work_dir, bf16_folder, threads))
    from qexplorer.core.quantize import torch_quant

    torch_quant.quiet_libraries()
    return (yield from torch_quant.produce_artifact(spec, precision, work_dir))
