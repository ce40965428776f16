"""The llama.cpp backend (GGUF): llama-bench's pp/tg measurement on llama.cpp's C API.

The timed loops call ``llama_decode`` through llama-cpp-python's low-level
bindings, as llama-bench's ``test_prompt`` / ``test_gen`` do: the token array
and its batch view are built once, nothing is copied out of the context while
timing (``Llama.eval`` rebuilds the batch and copies the last logits into
Python on every step: 0.875× llama-bench's tg on Q8_0), and every timer stops
after ``llama_synchronize`` (a CUDA build's decode returns before the device
has finished).

Per depth ``d`` (llama-bench ``-d``) and repetition: the context holds ``d``
prefilled tokens (outside the timing; prefilled once per depth and trimmed back
to ``d`` with ``llama_memory_seq_rm`` between tests), then

* pp: ``prompt_tokens`` tokens in batches of ``n_batch``, timed;
* TTFT: pp + one more decode step;
* tg: ``gen_tokens`` single-token decodes from depth ``d``, timed as one span.

Generation feeds the evaluation text's own token ids (no sampling is timed).
The warm-up runs the measured shape once (a full pp and a full tg), as
llama-bench's warm-up run does.

The timed context is not the one ``llama_cpp.Llama`` makes: that one has
flash attention off unless asked (llama-cpp-python maps its ``flash_attn``
flag to enabled / disabled), and llama-bench, llama-server and llama-cli
default to *auto* - on this CPU, pp512 on Q8_0 was 0.76× llama-bench's with it
off. :class:`Decoder` builds its own context the way llama-bench's
``to_llama_cparams`` does: llama.cpp's default context parameters, n_ctx =
depth + pp + tg, n_batch 2048, n_ubatch 512, the thread count for both.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from qexplorer.core.bench.loop import Repetition, run_series
from qexplorer.core.domain.bench import BenchConfig
from qexplorer.core.domain.events import JobEvent
from qexplorer.core.domain.record import Speed

N_BATCH = 2048  # llama-bench's defaults
N_UBATCH = 512


def load(path: Path, config: BenchConfig, n_gpu_layers: int = -1) -> Any:
    """The model and its tokenizer; the timed context is :class:`Decoder`'s own (its Llama context stays small)."""
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path), n_ctx=64, n_batch=64, n_ubatch=64, n_threads=config.thread_count,
        n_threads_batch=config.thread_count, n_gpu_layers=n_gpu_layers, logits_all=False, verbose=False,
    )


def prompt_ids(llm: Any, text: str, count: int) -> list[int]:
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    while len(ids) < count:
        ids = ids + ids
    return ids[:count]


class Decoder:
    """llama_decode on a context of its own (llama-bench's parameters), with its token arrays allocated once.

    Use as a context manager: the context is freed on exit."""

    def __init__(self, llm: Any, ids: list[int], config: BenchConfig) -> None:
        import llama_cpp

        params = llama_cpp.llama_context_default_params()  # flash attention: auto, as llama-bench
        params.n_ctx = config.context_tokens + 1  # + 1: the TTFT step after the prompt
        params.n_batch = N_BATCH
        params.n_ubatch = N_UBATCH
        params.n_threads = params.n_threads_batch = config.thread_count  # the same for pp and tg, recorded
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a benchmark context (out of memory?)")
        self._lib = llama_cpp
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._n_batch = N_BATCH
        self._ids = ids
        self._tokens = (llama_cpp.llama_token * len(ids))(*ids)
        self._one = (llama_cpp.llama_token * 1)()

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._ctx is not None:
            self._lib.llama_free(self._ctx)
            self._ctx = None

    def trim(self, keep: int) -> None:
        """Forget every position from ``keep`` on (0: an empty context)."""
        if keep == 0:
            self._lib.llama_memory_clear(self._memory, True)
        else:
            self._lib.llama_memory_seq_rm(self._memory, 0, keep, -1)

    def sync(self) -> None:
        self._lib.llama_synchronize(self._ctx)

    def prompt(self, count: int, offset: int = 0) -> None:
        """``count`` tokens of the text (cycled) in batches of n_batch."""
        done = 0
        while done < count:
            n = min(self._n_batch, count - done)
            start = (offset + done) % len(self._ids)
            if start + n > len(self._ids):
                n = len(self._ids) - start
            pointer = ctypes.cast(ctypes.byref(self._tokens, start * ctypes.sizeof(self._lib.llama_token)),
                                  ctypes.POINTER(self._lib.llama_token))
            self._decode(self._lib.llama_batch_get_one(pointer, n))
            done += n
        self.sync()

    def generate(self, steps: int) -> None:
        for step in range(steps):
            self._one[0] = self._ids[step % len(self._ids)]
            self._decode(self._lib.llama_batch_get_one(self._one, 1))
        self.sync()

    def _decode(self, batch: Any) -> None:
        rc = self._lib.llama_decode(self._ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} (the context is full or the batch is invalid)")


def _timed(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run(llm: Any, text: str, config: BenchConfig) -> Generator[JobEvent, None, tuple[Speed, ...]]:
    """Warm-up, then ``repetitions`` of pp and tg at each depth; yields progress, returns one Speed per depth."""
    # deep enough for the deepest prefill and then one whole pp batch: a timed pp never wraps into two decodes
    ids = prompt_ids(llm, text, max(config.max_depth + config.prompt_tokens, config.gen_tokens, 1))
    with Decoder(llm, ids, config) as decoder:
        return (yield from run_series(_Timed(decoder, config), config))


class _Timed:
    """llama-bench's test_prompt / test_gen on one :class:`Decoder`, for :func:`~.loop.run_series`."""

    def __init__(self, decoder: Decoder, config: BenchConfig) -> None:
        self.decoder, self.config = decoder, config

    def start_depth(self, depth: int) -> None:
        self.decoder.trim(0)
        if depth:
            self.decoder.prompt(depth)

    def warm_up(self, depth: int) -> None:
        self.decoder.prompt(self.config.prompt_tokens, offset=depth)
        self.decoder.trim(depth)
        self.decoder.generate(1)
        self.decoder.trim(depth)

    def repetition(self, depth: int, index: int) -> Repetition:
        decoder, config = self.decoder, self.config
        pp = _timed(decoder.prompt, config.prompt_tokens, depth)
        ttft = pp + _timed(decoder.generate, 1)
        decoder.trim(depth)
        tg = _timed(decoder.generate, config.gen_tokens)
        decoder.trim(depth)
        return Repetition(pp, ttft, config.gen_tokens / tg if tg > 0 else None)
