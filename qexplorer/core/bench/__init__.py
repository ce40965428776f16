"""Generation benchmarks with llama-bench's method (FACTS §3).

A warm-up run, then ``repetitions`` timed runs of prompt processing (pp: one
batch of ``prompt_tokens`` tokens) and token generation (tg: ``gen_tokens``
single-token decode steps); tokenization and sampling are outside the timing.
Every figure is reported as mean ± standard deviation over the repetitions.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchConfig:
    prompt_tokens: int = 512  # pp512
    gen_tokens: int = 128  # tg128
    repetitions: int = 5
    threads: int = 0  # 0: the library's default
    warmup: bool = True

    @staticmethod
    def quick() -> BenchConfig:
        """For demos and tests: pp64, tg16, two repetitions."""
        return BenchConfig(prompt_tokens=64, gen_tokens=16, repetitions=2)


@dataclass(frozen=True)
class Stat:
    mean: float
    sd: float
    n: int

    @staticmethod
    def of(values: list[float]) -> Stat:
        return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))

    def to_json(self) -> dict[str, float]:
        return {"mean": self.mean, "sd": self.sd, "n": self.n}


def rates(tokens: int, seconds: list[float]) -> Stat:
    """Tokens per second for each repetition, then mean ± sd (as llama-bench does)."""
    return Stat.of([tokens / s for s in seconds if s > 0])


def roofline_pct(decode_tok_s: float, bytes_per_token: float, bandwidth_bytes_s: float | None) -> float | None:
    """Decode speed as a percentage of the memory-bandwidth bound."""
    if not bandwidth_bytes_s or bytes_per_token <= 0:
        return None
    return 100.0 * decode_tok_s * bytes_per_token / bandwidth_bytes_s
