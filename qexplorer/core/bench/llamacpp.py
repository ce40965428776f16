"""The llama.cpp backend (GGUF): llama-bench's pp/tg measurement through llama-cpp-python.

Prompt processing evaluates ``prompt_tokens`` tokens in one batch; generation
decodes ``gen_tokens`` tokens one at a time from a fresh context, feeding a
fixed token so that no sampling is timed (llama-bench does the same). On a GPU
build ``llama_decode`` returns before the device has finished, so every timer
stops after ``llama_synchronize`` (as llama-bench does).
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from qexplorer.core.bench import BenchConfig, Stat, rates
from qexplorer.core.jobs.events import JobEvent, Progress
from qexplorer.core.jobs.record import Speed


def load(path: Path, config: BenchConfig, n_gpu_layers: int = -1) -> Any:
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=max(config.prompt_tokens + config.gen_tokens + 8, 256),
        n_batch=max(config.prompt_tokens, 64),
        n_ubatch=max(config.prompt_tokens, 64),
        n_threads=config.threads or (os.cpu_count() or 1),
        n_gpu_layers=n_gpu_layers,
        logits_all=False,
        verbose=False,
    )


def prompt_ids(llm: Any, text: str, count: int) -> list[int]:
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    while len(ids) < count:
        ids = ids + ids
    return ids[:count]


def _sync(llm: Any) -> None:
    """Wait for the device: a CUDA build's decode is asynchronous (a no-op on the CPU backend)."""
    import llama_cpp

    llama_cpp.llama_synchronize(llm.ctx)


def _time_prompt(llm: Any, ids: list[int]) -> float:
    llm.reset()
    _sync(llm)
    start = time.perf_counter()
    llm.eval(ids)
    _sync(llm)
    return time.perf_counter() - start


def _time_decode(llm: Any, token: int, steps: int) -> list[float]:
    llm.reset()
    llm.eval([token])
    _sync(llm)
    step_s = []
    for _ in range(steps):
        start = time.perf_counter()
        llm.eval([token])
        _sync(llm)
        step_s.append(time.perf_counter() - start)
    return step_s


def run(llm: Any, text: str, config: BenchConfig) -> Generator[JobEvent, None, Speed]:
    """Warm-up, then ``repetitions`` of pp and tg; yields progress, returns the speed."""
    ids = prompt_ids(llm, text, config.prompt_tokens)
    token = ids[-1]
    if config.warmup:
        _time_prompt(llm, ids[: min(32, len(ids))])
        _time_decode(llm, token, 4)
    pp_s, tg_s, ttft_s = [], [], []
    for rep in range(config.repetitions):
        pp = _time_prompt(llm, ids)
        first_start = time.perf_counter()
        llm.eval([token])
        _sync(llm)
        ttft_s.append(pp + time.perf_counter() - first_start)
        pp_s.append(pp)
        tg_s.append(sum(_time_decode(llm, token, config.gen_tokens)))
        yield Progress("benchmark", rep + 1, config.repetitions, f"repetition {rep + 1}")
    return Speed(prefill_tok_s=rates(config.prompt_tokens, pp_s), decode_tok_s=rates(config.gen_tokens, tg_s),
                 ttft_s=Stat.of(ttft_s), prompt_tokens=config.prompt_tokens, gen_tokens=config.gen_tokens,
                 repetitions=config.repetitions, threads=config.threads or (os.cpu_count() or 1))
