"""transformers: the fallback engine, and the quality pass of every Hugging Face artifact.

As an engine it runs only where vLLM is absent or has no kernel for the format
on this hardware, and its figures are labelled "transformers, weights
dequantized - not serving speed": compressed-tensors folders are decompressed to
BF16 and run as dense matmuls in eager PyTorch.

As the quality pass it is the artifact itself: loaded from the very folder that
is served, compressed-tensors keeps each layer's quantization scheme and
quantizes the *activations* in the forward pass (FP8 dynamic, W8A8, NVFP4), so
the measured KLD includes activation error and not just rounded weights
(checked on the bundled model: W8A8 as loaded differs from its weights alone by
up to 5.4 in a logit). vLLM's own log-probs are the cross-check beside it.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

from qexplorer.core.domain.events import JobEvent, Log, Metric, Phase
from qexplorer.core.domain.phases import PhaseKind
from qexplorer.core.domain.record import EngineInfo, MemoryFigures, QualityStats, ReferenceInfo, TaskScore, Timings
from qexplorer.core.engines.base import EngineContext, Measured, current_rss_bytes, peak_rss_bytes
from qexplorer.core.kinds import Engine, SupportMode

FALLBACK_LABEL = "transformers, weights dequantized - not serving speed"


def _load(ctx: EngineContext) -> tuple[Any, Any, float]:
    from qexplorer.core.quantize import torch_quant

    torch_quant.quiet_libraries()
    dtype = ctx.precision.key if ctx.precision.key in torch_quant.DTYPES else "bf16"
    started = time.perf_counter()
    model, tokenizer = torch_quant.load_model(ctx.artifact, dtype, ctx.device)
    return model, tokenizer, time.perf_counter() - started


def measure(ctx: EngineContext, fallback_reason: str | None = None,
            quality: tuple[QualityStats, float] | None = None) -> Generator[JobEvent, None, Measured]:
    """The fallback's speed and, unless ``quality`` already has it (the artifact's pass before vLLM failed), its
    quality."""
    import torch

    from qexplorer.core.bench import torch_timer
    from qexplorer.core.quantize import torch_quant

    job = ctx.job
    yield Phase(PhaseKind.LOAD, f"loading {ctx.artifact.name} with transformers")
    model, tokenizer, load_s = _load(ctx)
    resident = torch_quant.model_weight_bytes(model)
    loaded_rss = current_rss_bytes()
    mode = SupportMode.DEQUANTIZED if ctx.precision.quantized else SupportMode.NATIVE
    if ctx.precision.quantized:
        yield Log(f"{ctx.precision.label} measured with {FALLBACK_LABEL}", level="warning")
    ctx.check()
    yield Phase(PhaseKind.BENCHMARK, f"transformers: {job.bench.describe()}")
    first, *deeper = yield from ctx.checked(torch_timer.run(model, tokenizer, ctx.bench_text, job.bench))
    tasks: tuple[TaskScore, ...] = ()
    task_error = None
    if job.tasks:
        from qexplorer.core.tasks.run import TaskEngine, task_pass_kept

        tasks, task_error = yield from ctx.checked(task_pass_kept(job, str(Engine.TRANSFORMERS), lambda: TaskEngine(
            bool(getattr(tokenizer, "chat_template", None)), _generate(model, tokenizer)), ctx.cancel))
    quality_stats, quality_s = quality if quality is not None else (None, None)
    if ctx.reference is not None and quality is None:
        quality_stats, quality_s = yield from (reference_row(ctx) if is_reference(ctx) else _quality_of(ctx, model,
                                                                                                         tokenizer))
    version = __import__("transformers").__version__
    return Measured(
        engine=EngineInfo(name=Engine.TRANSFORMERS, mode=mode, device=ctx.device, version=f"transformers {version}",
                          kernel="dense PyTorch matmuls on dequantized weights" if ctx.precision.quantized
                          else f"dense PyTorch {torch.get_default_dtype()} matmuls",
                          serve_command=f"python -c \"from transformers import pipeline; "
                                        f"pipeline('text-generation', '{ctx.artifact}')\"",
                          fallback_reason=fallback_reason),
        memory=MemoryFigures(loaded_rss_bytes=loaded_rss, weight_bytes=ctx.artifact_weight_bytes,
                             resident_weight_bytes=resident, bytes_per_token=resident, **torch_cuda_peaks()),
        timings=Timings(load_s=load_s), speed=first, depth_speeds=tuple(deeper), quality=quality_stats,
        quality_s=quality_s, gpu_name=ctx.gpu_name, tasks=tasks, task_error=task_error,
    )


def _generate(model: Any, tokenizer: Any) -> Any:
    """The task pass's answers with ``generate()``: greedy, one prompt at a time, stopping at a stop string."""
    import torch

    from qexplorer.core.tasks.run import Answer

    device = next(model.parameters()).device

    def generate(prompts: Any) -> Any:
        for prompt in prompts:
            if prompt.chat:
                inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}],
                                                       add_generation_prompt=True, return_tensors="pt",
                                                       return_dict=True)
            else:
                inputs = tokenizer(prompt.text, return_tensors="pt")
            inputs = {k: v.to(device) for k, v in inputs.items()}
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=prompt.max_new_tokens, do_sample=False,
                                     stop_strings=list(prompt.stop) or None, tokenizer=tokenizer,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            new = out[0, inputs["input_ids"].shape[1]:]
            yield Answer(tokenizer.decode(new, skip_special_tokens=True), int(new.shape[0]))

    return generate


def release_memory() -> None:
    """Give back what a finished pass held (llm-compressor's session, Python's garbage, PyTorch's cached GPU
    blocks) before an engine loads the same weights beside this worker."""
    import gc
    import sys

    import torch

    if "llmcompressor" in sys.modules:  # its session keeps the model and modifiers alive after oneshot
        from llmcompressor.core import reset_session

        reset_session()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def torch_cuda_peaks() -> dict[str, int]:
    """PyTorch's own GPU high-water marks in this worker (allocated by tensors, reserved by its caching
    allocator); nothing on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"torch_peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
            "torch_peak_reserved_bytes": int(torch.cuda.max_memory_reserved())}


def is_reference(ctx: EngineContext) -> bool:
    """This job's artifact is the reference itself: its precision, on the device the reference ran on."""
    meta = ctx.reference[0] if ctx.reference is not None else None
    return meta is not None and meta.reference_precision == ctx.precision.key and meta.device == ctx.device


def reference_row(ctx: EngineContext) -> Generator[JobEvent, None, tuple[QualityStats, float]]:
    """The reference precision's quality row from the reference pass itself: exact, and no second pass."""
    from qexplorer.core import quality as quality_mod

    yield Log(f"{ctx.precision.label} is the reference: its quality row comes from the reference pass "
              "(KLD 0, top-1 100 %, PPL = the reference's), no second pass")
    return _with_reference_info(ctx, quality_mod.reference_self_stats(ctx.reference)), 0.0


def artifact_quality(ctx: EngineContext) -> Generator[JobEvent, None, tuple[QualityStats, float]]:
    """The quality of the served artifact itself (before another engine measures its speed)."""
    if is_reference(ctx):
        return (yield from reference_row(ctx))
    yield Phase(PhaseKind.LOAD, f"loading {ctx.artifact.name} for the quality pass")
    model, tokenizer, _ = _load(ctx)
    result = yield from _quality_of(ctx, model, tokenizer)
    return result


def _quality_of(ctx: EngineContext, model: Any, tokenizer: Any) -> Generator[JobEvent, None, tuple[QualityStats, float]]:
    from qexplorer.core import quality as quality_mod

    yield Phase(PhaseKind.QUALITY, "KLD, top-1 and perplexity of the artifact against the reference")
    probe = tokenizer(ctx.reference[0].probe_text, add_special_tokens=False)["input_ids"]
    quality_mod.check_alignment(ctx.reference[0], probe, int(model.config.vocab_size))
    result = yield from quality_pass(ctx, quality_mod.torch_logits_fn(model))
    return result


def quality_pass(ctx: EngineContext, logits_fn: Any) -> Generator[JobEvent, None, tuple[QualityStats, float]]:
    """The candidate pass against the reference; returns the statistics and the seconds it took."""
    from qexplorer.core import quality

    meta = ctx.reference[0]
    started = time.perf_counter()
    stats = yield from ctx.checked(quality.candidate_pass(ctx.reference, logits_fn))
    elapsed = time.perf_counter() - started
    stats = _with_reference_info(ctx, stats)
    if meta.device != ctx.device:
        yield Log(f"the reference ran on {meta.device} and this candidate on {ctx.device}: the KLD includes the two "
                  f"devices' numerics", level="warning")
    yield Metric("kld_mean", stats.kld_mean, "", stats.kld_sd)
    yield Metric("same_top1_pct", stats.same_top1_pct, "%", stats.same_top1_se_pct)
    return stats, elapsed


def _with_reference_info(ctx: EngineContext, stats: QualityStats) -> QualityStats:
    import dataclasses

    meta = ctx.reference[0]
    folder_bytes = sum(arr.nbytes for arr in ctx.reference[1].values())
    return dataclasses.replace(stats, quality_peak_rss_bytes=peak_rss_bytes(), reference=ReferenceInfo(
        precision=meta.reference_precision, quantized=meta.reference_quantized, corpus=meta.corpus_name,
        corpus_sha256=meta.corpus_sha256, n_tokens=meta.n_tokens, ctx=meta.ctx, n_chunks=meta.n_chunks,
        top_k=meta.top_k, chunking=f"{meta.n_chunks} chunks of {meta.ctx} tokens, BOS first, second half scored",
        cache_bytes=int(folder_bytes), device=meta.device, candidate_device=ctx.device))
