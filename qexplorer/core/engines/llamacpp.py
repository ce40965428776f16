"""llama.cpp: GGUF files, in the worker through llama-cpp-python (speed with llama-bench's method, quality with
llama-perplexity's)."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import replace
from importlib import metadata
from pathlib import Path

from qexplorer.core.domain.events import Cancelled, JobEvent, Log, Phase
from qexplorer.core.domain.phases import PhaseKind
from qexplorer.core.domain.record import EngineInfo, MemoryFigures, ServerSweep, TaskScore, Timings
from qexplorer.core.engines.base import EngineContext, Measured, current_rss_bytes, nvml_gpu_name
from qexplorer.core.errors import UserError
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
    del llm  # the task pass and the quality pass each need a larger context of their own
    tasks: tuple[TaskScore, ...] = ()
    task_error = None
    if job.tasks:
        tasks, task_error = yield from ctx.checked(_tasks(ctx, gpu))
    load_sweep = None
    if job.load is not None:
        load_sweep = yield from ctx.checked(_load_sweep(ctx, gpu))
    quality = quality_s = None
    if ctx.reference is not None:  # every position's logits: a context of its own
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
        quality_s=quality_s, tasks=tasks, task_error=task_error, server=load_sweep,
        gpu_name=(nvml_gpu_name() or "CUDA (llama.cpp offload)") if gpu else None,
    )


def _load_sweep(ctx: EngineContext, gpu: bool) -> Generator[JobEvent, None, ServerSweep | None]:
    """The load sweep (JobSpec.load) in llama.cpp's own server, built from the llama.cpp this llama-cpp-python
    vendors (scripts/setup.sh): llama-cpp-python's server interrupts a running request when another arrives, so
    it cannot be measured under load. One slot per stream of the highest level (``--parallel``), each with the
    sweep's context; the same file, threads and offload as the benchmark. The start counts as the sweep's (its
    fixed part in the ETA); a server that cannot start is one warning, and the job keeps what it measured."""
    from qexplorer.core.server.sweep import job_load_sweep
    from qexplorer.core.serving.llama_server import LlamaServer, LlamaServerSettings

    load = ctx.job.load
    assert load is not None
    settings = LlamaServerSettings(model_path=ctx.artifact, parallel=load.slots, ctx_per_slot=load.context_tokens,
                                   threads=ctx.job.bench.thread_count, n_gpu_layers="all" if gpu else 0)
    yield Phase(PhaseKind.LOAD_SWEEP, f"starting llama-server with {load.slots} slots: {settings.serve_command}")
    log_dir = Path(ctx.job.data_dir) / "logs" / f"llama-server-{ctx.job.precision}-{int(time.time() * 1000)}"
    try:
        with LlamaServer(settings, log_dir) as server:
            url = server.start(ctx.cancel)
            return (yield from job_load_sweep(url, load))
    except Cancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - the job keeps what it measured; the reason is one warning
        reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        yield Log(f"The load sweep was not run: {reason}", level="warning")
        return None


def _tasks(ctx: EngineContext, gpu: bool) -> Generator[JobEvent, None, tuple[tuple[TaskScore, ...], str | None]]:
    """The task pass (core.tasks.run) on the same GGUF file, threads and offload as the benchmark, with flash
    attention on as llama-server runs it by default; the chat template is the one the file carries."""
    import llama_cpp

    from qexplorer.core.tasks.run import TASK_CONTEXT_TOKENS, Answer, Prompt, TaskEngine, task_pass_kept

    threads = ctx.job.bench.thread_count

    def start() -> TaskEngine:
        llm = llama_cpp.Llama(model_path=str(ctx.artifact), n_ctx=TASK_CONTEXT_TOKENS, n_threads=threads,
                              n_threads_batch=threads, n_gpu_layers=-1 if gpu else 0, verbose=False,
                              flash_attn=True)

        def generate(prompts: Sequence[Prompt]) -> Iterator[Answer]:
            for prompt in prompts:
                # greedy (temperature 0: llama-cpp-python's greedy sampler), no repetition penalty
                settings = {"temperature": 0.0, "max_tokens": prompt.max_new_tokens, "repeat_penalty": 1.0,
                            "stop": list(prompt.stop) or None}
                if prompt.chat:
                    out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt.text}], **settings)
                    text = out["choices"][0]["message"]["content"] or ""
                else:
                    out = llm.create_completion(prompt.text, **settings)
                    text = out["choices"][0]["text"]
                yield Answer(text, int(out["usage"]["completion_tokens"]))

        return TaskEngine(chat=bool(llm.metadata.get("tokenizer.chat_template")), generate=generate)

    return (yield from task_pass_kept(ctx.job, str(Engine.LLAMA_CPP), start, ctx.cancel))
