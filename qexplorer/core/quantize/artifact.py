"""One artifact per precision, and one producer each: the thing benchmark, quality and export all use.

* GGUF precisions: ``<key>.gguf`` from llama.cpp's quantizer (a Hugging Face model goes through llama.cpp's
  own converter to a BF16 GGUF first).
* Hugging Face precisions: a folder - the BF16 checkpoint, a cast of it, or a compressed-tensors folder from
  llm-compressor (:func:`qexplorer.core.quantize.torch_quant.produce_artifact`).

Made once per model file (under a lock) and reused by every later job and the export.

Every artifact qexplorer made is checked against the plan before anything uses it:

    ratio = weight-file bytes / planned weight bytes (planner.weight_bytes)
    refused if ratio > 1.25

Only weight files count (the ``.gguf``, a folder's ``*.safetensors``): the tokenizer and config are a fixed
size the plan does not count (3.5 MB on the bundled model, 9 KB on a 2-layer test MoE - a quarter of its
weights). Measured weight-file / planned ratios: the bundled SmolLM2 GGUF 1.000-1.001 for every Hugging Face
precision and 1.01-1.06 for the GGUF ones (the plan uses llama.cpp's bits per weight); the synthetic moe-small
and dense-185m 0.98-1.06; the 2-layer test MoEs (tests/models.tiny_moe) up to 1.16 (their safetensors headers,
18 KB of 144 KB, are the excess). Far above that, the quantizer left whole classes of tensors wide - the case
seen: a fused-expert MoE whose experts llm-compressor did not linearize stays BF16, an "FP8" folder about twice
its plan (reviews P2-7). A user's own checkpoint served as it is (BF16 of a Hugging Face model) is not checked:
it is what they gave.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

from qexplorer.core.domain.events import JobEvent
from qexplorer.core.errors import UserError
from qexplorer.core.kinds import ModelFormat, Producer
from qexplorer.core.model import ModelSpec
from qexplorer.core.planner import weight_bytes
from qexplorer.core.precisions import Precision
from qexplorer.core.units import format_bytes

OVERSIZE_RATIO = 1.25


def produce(spec: ModelSpec, precision: Precision, work_dir: Path, threads: int = 0) -> Generator[JobEvent, None, Path]:
    """The artifact (made now, or found), refused if far above its planned size; torch_quant.TRUST_REMOTE_CODE
    is set once per worker by run_job."""
    if precision.is_gguf:
        from qexplorer.core.quantize.gguf_quant import gguf_for

        bf16_folder = None
        if spec.format == ModelFormat.HF:
            from qexplorer.core.quantize.torch_quant import bf16_checkpoint

            bf16_folder = yield from bf16_checkpoint(spec, work_dir)
        artifact = yield from gguf_for(spec, precision, work_dir, bf16_folder, threads)
    else:
        from qexplorer.core.quantize import torch_quant

        torch_quant.quiet_libraries()
        artifact = yield from torch_quant.produce_artifact(spec, precision, work_dir)
    if artifact != Path(spec.path):
        check_size(spec, precision, artifact)
    return artifact


def weight_file_bytes(artifact: Path) -> int:
    """Bytes of an artifact's weights: the GGUF file, or a folder's safetensors shards."""
    if artifact.is_file():
        return artifact.stat().st_size
    return sum(p.stat().st_size for p in artifact.glob("*.safetensors"))


def oversize_reason(precision: Precision, is_moe: bool, artifact: Path, actual_bytes: int,
                    planned_bytes: int) -> str | None:
    """The sentence that refuses an artifact more than 25 % above its planned weight bytes; None if it is not."""
    if planned_bytes <= 0 or actual_bytes <= OVERSIZE_RATIO * planned_bytes:
        return None
    if precision.is_gguf:
        why = f"llama.cpp probably kept more tensors wide than its {precision.gguf_type} preset does"
    elif precision.producer == Producer.CAST:
        why = f"some of its tensors are probably wider than {precision.label}"
    elif is_moe:
        why = "its experts were probably left in BF16 (llm-compressor did not linearize the fused experts)"
    else:
        why = "some of its layers were probably left in BF16 (llm-compressor did not quantize them)"
    return (f"The {precision.label} artifact {artifact.name} holds {format_bytes(actual_bytes, precision=2)} of "
            f"weights, {actual_bytes / planned_bytes:.1f}× its planned {format_bytes(planned_bytes, precision=2)}: "
            f"{why}; refusing to measure or export it (delete {artifact} to make it again).")


def check_size(spec: ModelSpec, precision: Precision, artifact: Path) -> None:
    """Raise the refusal of :func:`oversize_reason` for an artifact far above its plan."""
    reason = oversize_reason(precision, spec.is_moe, artifact, weight_file_bytes(artifact),
                             weight_bytes(spec, precision))
    if reason is not None:
        raise UserError(reason)
