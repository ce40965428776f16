"""The transformers backend (torch precisions), measured like llama-bench.

Prefill: one forward pass over ``prompt_tokens`` tokens. Decode: ``gen_tokens``
single-token forward passes with the KV cache from a fresh one-token context,
feeding a fixed token (no sampling in the timing). Stock eager PyTorch: no
static cache, no torch.compile - the numbers are what ``generate()`` users get.
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator
from typing import Any

from qexplorer.core.bench import BenchConfig, Stat, rates
from qexplorer.core.jobs.events import JobEvent, Progress
from qexplorer.core.jobs.record import Speed


def prompt_ids(tokenizer: Any, text: str, count: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < count:
        ids = ids + ids
    return ids[:count]


def run(model: Any, tokenizer: Any, text: str, config: BenchConfig) -> Generator[JobEvent, None, Speed]:
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, text, config.prompt_tokens)], device=device)
    token = ids[:, -1:]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def prefill(batch: Any) -> tuple[float, Any]:
        sync()
        start = time.perf_counter()
        out = model(batch, use_cache=True)
        sync()
        return time.perf_counter() - start, out.past_key_values

    def decode(steps: int) -> float:
        cache = model(token, use_cache=True).past_key_values
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            cache = model(token, past_key_values=cache, use_cache=True).past_key_values
        sync()
        return time.perf_counter() - start

    pp_s, tg_s, ttft_s = [], [], []
    with torch.inference_mode():
        if config.warmup:
            prefill(ids[:, : min(32, ids.shape[1])])
            decode(4)
        for rep in range(config.repetitions):
            pp, cache = prefill(ids)
            start = time.perf_counter()
            model(token, past_key_values=cache, use_cache=True)
            sync()
            ttft_s.append(pp + time.perf_counter() - start)
            pp_s.append(pp)
            tg_s.append(decode(config.gen_tokens))
            yield Progress("benchmark", rep + 1, config.repetitions, f"repetition {rep + 1}")
    return Speed(prefill_tok_s=rates(config.prompt_tokens, pp_s), decode_tok_s=rates(config.gen_tokens, tg_s),
                 ttft_s=Stat.of(ttft_s), prompt_tokens=config.prompt_tokens, gen_tokens=config.gen_tokens,
                 repetitions=config.repetitions,
                 threads=config.threads or torch.get_num_threads() or (os.cpu_count() or 1))
