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

from qexplorer.core.bench.loop import Repetition, run_series
from qexplorer.core.domain.bench import BenchConfig
from qexplorer.core.domain.events import JobEvent
from qexplorer.core.domain.record import Speed


def prompt_ids(tokenizer: Any, text: str, count: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < count:
        ids = ids + ids
    return ids[:count]


def run(model: Any, tokenizer: Any, text: str, config: BenchConfig) -> Generator[JobEvent, None, tuple[Speed, ...]]:
    """Warm-up, then ``repetitions`` of pp and tg at each depth; yields progress, returns one Speed per depth."""
    import torch

    torch.set_num_threads(config.thread_count)  # the same default as every other engine (physical cores)
    with torch.inference_mode():
        return (yield from run_series(_Timed(model, tokenizer, text, config), config))


class _Timed:
    """pp / TTFT / tg as forward passes on a DynamicCache, for :func:`~.loop.run_series`."""

    def __init__(self, model: Any, tokenizer: Any, text: str, config: BenchConfig) -> None:
        import torch

        self.model, self.config = model, config
        self.device = next(model.parameters()).device
        self.ids = torch.tensor([prompt_ids(tokenizer, text, config.max_depth + config.prompt_tokens)],
                                device=self.device)
        self.token = self.ids[:, -1:]
        self.cache: Any = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()

    def _forward(self, batch: Any) -> None:
        self.model(batch, past_key_values=self.cache, use_cache=True, logits_to_keep=1)

    def _generate(self, steps: int) -> None:
        for _ in range(steps):
            self._forward(self.token)

    def _timed(self, fn: Any, *args: Any) -> float:
        self._sync()
        start = time.perf_counter()
        fn(*args)
        self._sync()
        return time.perf_counter() - start

    def _prompt(self, depth: int) -> Any:
        return self.ids[:, depth: depth + self.config.prompt_tokens]

    def start_depth(self, depth: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()
        if depth:
            self._forward(self.ids[:, :depth])

    def warm_up(self, depth: int) -> None:
        self._forward(self._prompt(depth))
        self.cache.crop(depth)
        self._generate(1)
        self.cache.crop(depth)

    def repetition(self, depth: int, index: int) -> Repetition:
        pp = self._timed(self._forward, self._prompt(depth))
        ttft = pp + self._timed(self._forward, self.token)
        self.cache.crop(depth)
        tg = self._timed(self._generate, self.config.gen_tokens)
        self.cache.crop(depth)
        return Repetition(pp, ttft, self.config.gen_tokens / tg if tg > 0 else None)
