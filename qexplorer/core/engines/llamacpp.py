"""llama.cpp: GGUF files, in the worker through llama-cpp-python (speed with llama-bench's method, quality with
llama-perplexity's)."""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import replace
from importlib import metadata

from qexplorer.core.domain.events import JobEvent, Phase
from qexplorer.core.domain.phases import PhaseKind
from qexplorer.core.domain.record import EngineInfo, MemoryFigures, Timings
from qexplorer.core.engines.base import EngineContext, Measured, current_rss_bytes, nvml_gpu_name
from qexplorer.core.kinds import Engine, SupportMode


def measure(ctx: EngineContext) -> Generator[JobEvent, None, Measured]:
    import llama_cpp

    from qexplorer.core.bench import llamacpp_timer
    from qexplorer.core.gguf_header import read_gguf_header

    job = ctx.job
    yield Phase(PhaseKind.LOAD, f"loading {ctx.artifact.name} with llama.cpp")
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    ctx = replace(ctx, device="cuda" if gpu else "cpu")  # this engine's device, not torch's
    started = time.perf_counter()
    llm = llamacpp_timer.load(ctx.artifact, job.bench, n_gpu_layers=-1 if gpu else 0)
    load_s = time.perf_counter() - started
    loaded_rss = current_rss_bytes()
    weight_bytes = sum(t.n_bytes for t in read_gguf_header(ctx.artifact).tensors)
    ctx.check()
    yield Phase(PhaseKind.BENCHMARK, f"llama.cpp: {job.bench.describe()}, {job.bench.thread_count} threads")
    first, *deeper = yield from ctx.checked(llamacpp_timer.run(llm, ctx.bench_text, job.bench))
    quality = quality_s = None
    if ctx.reference is not None:
        del llm  # the quality pass needs every position's logits: a second context
        from qexplorer.core import quality as quality_mod
        from qexplorer.core.engines.transformers import quality_pass

        yield Phase(PhaseKind.QUALITY, "KLD, top-1 and perplexity against the reference")
        # flash attention on, as llama-server and llama-bench run it by default (auto): the logits scored are the
        # ones the user will be served (it also makes the pass about 12 % faster here)
        qllm = llama_cpp.Llama(model_path=str(ctx.artifact), n_ctx=job.quality_ctx, n_batch=job.quality_ctx,
                               n_ubatch=job.quality_ctx, n_threads=job.bench.thread_count,
                               n_gpu_layers=-1 if gpu else 0, logits_all=True, verbose=False, flash_attn=True)
        probe = qllm.tokenize(ctx.reference[0].probe_text.encode(), add_bos=False, special=False)
        quality_mod.check_alignment(ctx.reference[0], probe, qllm.n_vocab())
        quality, quality_s = yield from quality_pass(ctx, quality_mod.llamacpp_logits_fn(qllm))
    threads = job.bench.thread_count
    return Measured(
        engine=EngineInfo(name=Engine.LLAMA_CPP, mode=SupportMode.NATIVE, device="cuda" if gpu else "cpu",
                          version=f"llama-cpp-python {metadata.version('llama-cpp-python')}",
                          kernel=("llama.cpp CUDA backend" if gpu else "llama.cpp CPU backend")
                          + ", flash attention auto (llama-bench's default)",
                          serve_command=f"llama-server -m {ctx.artifact} -t {threads} -ngl {99 if gpu else 0}"),
        memory=MemoryFigures(loaded_rss_bytes=loaded_rss, weight_bytes=weight_bytes,
                             resident_weight_bytes=weight_bytes, bytes_per_token=weight_bytes),
        timings=Timings(load_s=load_s), speed=first, depth_speeds=tuple(deeper), quality=quality,
        quality_s=quality_s,
        gpu_name=(nvml_gpu_name() or "CUDA (llama.cpp offload)") if gpu else None,
    )
