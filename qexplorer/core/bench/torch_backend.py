"""The transformers backend (torch precisions), measured like llama-bench.

Per depth ``d`` (llama-bench ``-d``): the KV cache holds ``d`` prefilled tokens
(outside the timing; prefilled once per depth and cropped back to ``d`` between
tests), then

* pp: one forward pass over ``prompt_tokens`` tokens on top of that cache,
  keeping the logits of the last position only (``logits_to_keep=1``, as
  ``generate()`` does: computing all of them is 512 × vocab of work nobody uses);
* TTFT: pp + one more decode step;
* tg: ``gen_tokens`` single-token forward passes from depth ``d``, feeding a
  fixed token (no sampling in the timing).

The warm-up runs the measured shape once (a full pp and a full tg). Stock eager
PyTorch: no static cache, no torch.compile - the numbers are what ``generate()``
users get.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

from qexplorer.core.bench import BenchConfig, Stat, rates
from qexplorer.core.bench.noise import NoiseProbe
from qexplorer.core.jobs.events import JobEvent, Progress
from qexplorer.core.jobs.phases import PhaseKind
from qexplorer.core.jobs.record import Speed


def prompt_ids(tokenizer: Any, text: str, count: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < count:
        ids = ids + ids
    return ids[:count]


def run(model: Any, tokenizer: Any, text: str, config: BenchConfig) -> Generator[JobEvent, None, tuple[Speed, ...]]:
    """Warm-up, then ``repetitions`` of pp and tg at each depth; yields progress, returns one Speed per depth."""
    import torch
    from transformers import DynamicCache

    threads = config.thread_count  # the same default as every other engine (physical cores)
    torch.set_num_threads(threads)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, text, config.max_depth + config.prompt_tokens)], device=device)
    token = ids[:, -1:]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def forward(batch: Any, cache: Any) -> None:
        model(batch, past_key_values=cache, use_cache=True, logits_to_keep=1)

    def timed(fn: Any, *args: Any) -> float:
        sync()
        start = time.perf_counter()
        fn(*args)
        sync()
        return time.perf_counter() - start

    def generate(cache: Any, steps: int) -> None:
        for _ in range(steps):
            forward(token, cache)

    total = config.repetitions * len(config.depths)
    speeds = []
    with torch.inference_mode():
        for d_index, depth in enumerate(config.depths):
            cache = DynamicCache()
            if depth:
                yield Progress(PhaseKind.BENCHMARK, d_index * config.repetitions, total, f"prefilling a depth of {depth} tokens")
                forward(ids[:, :depth], cache)
            prompt = ids[:, depth: depth + config.prompt_tokens]
            if config.warmup and d_index == 0:  # llama-bench's warm-up: the prompt once, then one generated token
                forward(prompt, cache)
                cache.crop(depth)
                generate(cache, 1)
                cache.crop(depth)
            noise = NoiseProbe().start()
            pp_s, tg_s, ttft_s = [], [], []
            while not pp_s or not config.settled(pp_s, tg_s):  # adaptive: see BenchConfig.settled
                pp = timed(forward, prompt, cache)
                ttft_s.append(pp + timed(forward, token, cache))
                pp_s.append(pp)
                cache.crop(depth)
                tg_s.append(timed(generate, cache, config.gen_tokens))
                cache.crop(depth)
                yield Progress(PhaseKind.BENCHMARK, d_index * config.repetitions + len(pp_s), total,
                               f"repetition {len(pp_s)}" + (f" at depth {depth}" if depth else ""))
            decode = rates(config.gen_tokens, tg_s)
            speeds.append(Speed(prefill_tok_s=rates(config.prompt_tokens, pp_s), decode_tok_s=decode,
                                ttft_s=Stat.of(ttft_s), prompt_tokens=config.prompt_tokens,
                                gen_tokens=config.gen_tokens, repetitions=len(pp_s), threads=threads,
                                depth=depth, noise=noise.stop(decode.cv_pct)))
    return tuple(speeds)
