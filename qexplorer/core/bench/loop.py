"""The one benchmark series loop (llama-bench's method), fed by each engine's own timed calls.

For each depth: bring the context to that depth (untimed), the warm-up at the first depth (llama-bench's: the
prompt once, then one generated token), then repetitions until :meth:`BenchConfig.settled` says the spread is
known, the whole series bracketed by the noise probe; one :class:`Speed` per depth. An engine supplies only
what differs - how it prefills, warms up and times one repetition (:class:`TimedEngine`); llama.cpp, the
transformers fallback and vLLM all run through :func:`run_series`, so a change to the method is made once.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Protocol

from qexplorer.core.bench.noise import NoiseProbe
from qexplorer.core.domain.bench import BenchConfig, Stat, rates
from qexplorer.core.domain.events import JobEvent, Progress
from qexplorer.core.domain.phases import PhaseKind
from qexplorer.core.domain.record import Speed


@dataclass(frozen=True)
class Repetition:
    """One timed repetition: the prompt's processing time, the time to the first generated token, and the decode
    rate (None where the engine could not time one: a stream of one token)."""

    pp_s: float
    ttft_s: float
    decode_tok_s: float | None


class TimedEngine(Protocol):
    def start_depth(self, depth: int) -> None:
        """An empty context, then ``depth`` tokens prefilled outside the timing."""

    def warm_up(self, depth: int) -> None:
        """Untimed: the measured shape once (the prompt and one token)."""

    def repetition(self, depth: int, index: int) -> Repetition:
        """One timed pp and tg from ``depth``; leaves the context at ``depth``."""


def run_series(engine: TimedEngine, config: BenchConfig) -> Generator[JobEvent, None, tuple[Speed, ...]]:
    total = config.repetitions * len(config.depths)
    speeds = []
    for d_index, depth in enumerate(config.depths):
        done = d_index * config.repetitions
        if depth:
            yield Progress(PhaseKind.BENCHMARK, done, total, f"prefilling a depth of {depth} tokens")
        engine.start_depth(depth)
        if config.warmup and d_index == 0:
            engine.warm_up(depth)
        noise = NoiseProbe().start()  # the measuring process tree (worker, its server) is not noise
        pp_s: list[float] = []
        ttft_s: list[float] = []
        decode: list[float] = []
        while not pp_s or not config.settled(pp_s, decode):  # adaptive: see BenchConfig.settled
            rep = engine.repetition(depth, len(pp_s))
            pp_s.append(rep.pp_s)
            ttft_s.append(rep.ttft_s)
            if rep.decode_tok_s is not None:
                decode.append(rep.decode_tok_s)
            yield Progress(PhaseKind.BENCHMARK, done + len(pp_s), total,
                           f"repetition {len(pp_s)}" + (f" at depth {depth}" if depth else ""))
        decode_stat = Stat.of(decode)
        speeds.append(Speed(prefill_tok_s=rates(config.prompt_tokens, pp_s), decode_tok_s=decode_stat,
                            ttft_s=Stat.of(ttft_s), prompt_tokens=config.prompt_tokens, gen_tokens=config.gen_tokens,
                            repetitions=len(pp_s), threads=config.thread_count, depth=depth,
                            noise=noise.stop(decode_stat.cv_pct)))
    return tuple(speeds)
