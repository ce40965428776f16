"""The one benchmark series loop (core.bench.loop), driven by a scripted engine: the method's order of calls,
the adaptive stop, one Speed per depth, and an engine that times no decode (a one-token stream)."""

from __future__ import annotations

from qexplorer.core.bench.loop import Repetition, run_series
from qexplorer.core.domain.bench import BenchConfig
from qexplorer.core.domain.events import Progress, drive
from qexplorer.core.results import _pm


class Scripted:
    def __init__(self, decode: float | None = 100.0, jitter: float = 0.0) -> None:
        self.calls: list[tuple[str, int]] = []
        self.decode, self.jitter = decode, jitter

    def start_depth(self, depth: int) -> None:
        self.calls.append(("start", depth))

    def warm_up(self, depth: int) -> None:
        self.calls.append(("warm-up", depth))

    def repetition(self, depth: int, index: int) -> Repetition:
        self.calls.append(("rep", depth))
        sign = 1 if index % 2 else -1
        decode = None if self.decode is None else self.decode * (1 + sign * self.jitter)
        return Repetition(pp_s=0.5 * (1 + sign * self.jitter), ttft_s=0.51, decode_tok_s=decode)


def test_the_method_in_order_and_the_adaptive_stop():
    engine = Scripted(jitter=0.0)
    events: list[Progress] = []
    config = BenchConfig(prompt_tokens=512, gen_tokens=128, repetitions=5, depths=(0, 1024), threads=2)
    speeds = drive(run_series(engine, config), events.append)
    # warm-up once, at the first depth; a quiet series stops at the minimum of three repetitions
    assert engine.calls == [("start", 0), ("warm-up", 0), ("rep", 0), ("rep", 0), ("rep", 0),
                            ("start", 1024), ("rep", 1024), ("rep", 1024), ("rep", 1024)]
    assert [s.depth for s in speeds] == [0, 1024] and all(s.repetitions == 3 for s in speeds)
    assert speeds[0].prefill_tok_s.mean == 1024.0 and speeds[0].decode_tok_s.mean == 100.0
    assert speeds[0].threads == 2
    assert any("prefilling a depth of 1024" in e.message for e in events)


def test_a_spread_series_runs_the_full_count():
    speeds = drive(run_series(Scripted(jitter=0.2), BenchConfig(repetitions=5)))
    assert speeds[0].repetitions == 5 and speeds[0].decode_tok_s.sd > 0


def test_an_engine_that_times_no_decode_gives_a_missing_figure_not_a_crash():
    """Before, vLLM's one-token streams left no decode samples and Stat.of([]) raised StatisticsError."""
    speeds = drive(run_series(Scripted(decode=None), BenchConfig(repetitions=3)))
    assert speeds[0].decode_tok_s.n == 0 and speeds[0].decode_tok_s.known_mean is None
    assert _pm(speeds[0].decode_tok_s) == "n/a" and speeds[0].prefill_tok_s.n == 3
