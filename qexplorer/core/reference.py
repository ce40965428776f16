"""The quality reference of a model: computed once per model file + corpus + settings, then reused.

Every candidate of a run, later runs, and ``bench-server --quality`` read the
same cached top-k log-probabilities (:mod:`qexplorer.core.quality` holds the
method). Building takes a lock, so two processes that want the same reference
compute it once.
"""

from __future__ import annotations

import gc
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qexplorer.core import quality
from qexplorer.core.artifacts import file_lock, model_key
from qexplorer.core.domain.events import JobEvent, Log, Phase
from qexplorer.core.domain.phases import PhaseKind
from qexplorer.core.kinds import ModelFormat
from qexplorer.core.model import ModelSpec

if TYPE_CHECKING:
    from qexplorer.core.domain.spec import JobSpec

Reference = tuple[quality.ReferenceMeta, dict[str, Any]]


def job_corpus(job: JobSpec) -> quality.Corpus:
    return quality.corpus_for(job.quality_corpus, job.quality_tokens)


def job_device() -> str:
    """The device the job's engine runs on, and so the reference's: "cuda" where torch sees a GPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def ensure_reference(spec: ModelSpec, job: JobSpec, work_dir: Path,
                     device: str = "cpu") -> Generator[JobEvent, None, Reference]:
    """The reference log-probs for this model + corpus: from the cache, or computed now (once) on ``device`` -
    the job's own, so that KLD measures the format and not two devices' numerics. A cached reference made on
    another device is reused and says where it ran (the quality figure is then labelled)."""
    from qexplorer.core.quantize import torch_quant

    corpus = job_corpus(job)
    folder = quality.reference_dir(Path(job.data_dir), model_key(spec), corpus, job.reference_precision,
                                   job.quality_ctx, job.quality_tokens, job.top_k)
    with file_lock(folder.with_name(folder.name + ".lock")):
        cached = quality.load_reference(folder)
        if cached is not None:
            yield Log(f"reusing the {job.reference_precision} reference for {corpus.name} ({folder.name})")
            return cached
        torch_quant.quiet_libraries()
        source = yield from torch_quant.bf16_checkpoint(spec, work_dir)
        yield Phase(PhaseKind.REFERENCE, f"{job.reference_precision} reference log-probs on {corpus.name} (once, {device})")
        model, tokenizer = torch_quant.load_model(source, job.reference_precision, device)
        ids = tokenizer(corpus.text, add_special_tokens=False)["input_ids"][: job.quality_tokens]
        bos = tokenizer.bos_token_id if _adds_bos(spec, tokenizer) else None
        chunks = quality.make_chunks(ids, job.quality_ctx, bos)
        probe = quality.probe_text(corpus)
        meta = quality.ReferenceMeta(
            format=quality.REFERENCE_FORMAT, model_path=spec.path, reference_precision=job.reference_precision,
            corpus_name=corpus.name, corpus_sha256=corpus.sha256, n_tokens=len(chunks) * job.quality_ctx,
            ctx=job.quality_ctx, n_chunks=len(chunks), top_k=job.top_k, bos_id=bos,
            vocab_size=int(model.config.vocab_size), probe_text=probe,
            probe_ids=tokenizer(probe, add_special_tokens=False)["input_ids"],
            reference_quantized=spec.stored_quantized, device=device,
        )
        yield from quality.build_reference(folder, quality.torch_logits_fn(model), chunks, meta)
        del model
        gc.collect()
        loaded = quality.load_reference(folder)
        assert loaded is not None
        return loaded


def _adds_bos(spec: ModelSpec, tokenizer: Any) -> bool:
    """Whether the model expects BOS: GGUF's tokenizer.ggml.add_bos_token, else the tokenizer's own flag."""
    if spec.format == ModelFormat.GGUF:
        from qexplorer.core.gguf_header import read_gguf_header

        value = read_gguf_header(Path(spec.path)).metadata.get("tokenizer.ggml.add_bos_token")
        if isinstance(value, bool):
            return value
    return bool(getattr(tokenizer, "add_bos_token", False)) and tokenizer.bos_token_id is not None
