"""Capacity under load as the compare table and the exports read it (measured; core.capacity plans the
sequences that fit): from a load sweep (:class:`~qexplorer.core.domain.record.ServerSweep` with a ``load_plan``),
the goodput at its first depth - the highest concurrency that met the service objective and the output tok/s
there - and the throughput-by-concurrency curve behind it.

Two goodputs tie like two decode speeds (core.compare.speed_tied): within two standard errors of their
difference or 2 % of the larger. The spread is that of the goodput level's aggregate tok/s over its
repetitions (sd / √n); the goodput figure itself is every token ÷ the summed wall time (GuideLLM's
``output_tokens_per_second``), the same quantity pooled, so its repetitions' spread stands for its own. Without
repetitions (n < 2) only the 2 % floor applies.
"""

from __future__ import annotations

from dataclasses import dataclass

from qexplorer.core.domain.record import ServerSweep

GOODPUT_TIE_PCT = 2.0


@dataclass(frozen=True)
class LoadCapacity:
    """What a load sweep says a precision serves within its objective, at the sweep's first depth."""

    objective: str  # ServiceObjective.describe(): "TTFT p99 ≤ 2 s, ITL p99 ≤ 100 ms, no errors"
    streams: int | None  # the highest concurrency that met the objective; None: none did
    output_tok_s: float | None  # output tok/s (all streams) at that concurrency
    requests_per_s: float | None
    sentence: str  # the goodput's own sentence ("serves 4 streams at …" / "no concurrency tested meets …")
    curve: tuple[tuple[int, float], ...] = ()  # (concurrency, output tok/s) of every level, rising concurrency
    output_sd: float | None = None  # sd of the goodput level's aggregate tok/s over its repetitions
    output_n: int = 0  # those repetitions
    stopped_early: str | None = None  # why the sweep skipped its remaining levels
    depth: int = 0

    @property
    def highest_tested(self) -> int | None:
        return max((c for c, _tok_s in self.curve), default=None)

    @property
    def output_se(self) -> float:
        return (self.output_sd or 0.0) / self.output_n ** 0.5 if self.output_n > 1 else 0.0


def capacity_from_sweep(sweep: ServerSweep | None) -> LoadCapacity | None:
    """The capacity of a load sweep; None for no sweep, or a sweep without a load plan (no objective, no goodput)."""
    if sweep is None or sweep.load_plan is None:
        return None
    depth = sweep.depths[0] if sweep.depths else 0
    levels = sorted((lv for lv in sweep.levels if lv.depth == depth and lv.load is not None),
                    key=lambda lv: lv.concurrency)
    good = next((g for g in sweep.goodput if g.depth == depth), sweep.goodput[0] if sweep.goodput else None)
    at = next((lv for lv in levels if good is not None and lv.concurrency == good.concurrency), None)
    objective = sweep.load_plan.objective.describe()
    return LoadCapacity(
        objective=objective,
        streams=good.concurrency if good else None,
        output_tok_s=good.output_tokens_per_second if good else None,
        requests_per_s=good.requests_per_second if good else None,
        sentence=good.sentence if good else f"no level was measured against {objective}",
        curve=tuple((lv.concurrency, lv.load.output_tokens_per_second) for lv in levels if lv.load is not None),
        output_sd=at.aggregate_tok_s.sd if at is not None and at.aggregate_tok_s.n else None,
        output_n=at.aggregate_tok_s.n if at is not None else 0,
        stopped_early=sweep.stopped_early, depth=depth,
    )


def goodput_tied(a: LoadCapacity | None, b: LoadCapacity | None) -> bool:
    """The two goodputs are closer than the measurement tells apart (see the module's note); two rows that meet
    the objective nowhere tie with each other."""
    x = a.output_tok_s if a is not None and a.streams is not None else None
    y = b.output_tok_s if b is not None and b.streams is not None else None
    if x is None or y is None:
        return x is None and y is None
    se = (a.output_se ** 2 + b.output_se ** 2) ** 0.5
    return abs(x - y) <= max(2 * se, GOODPUT_TIE_PCT / 100 * max(x, y))


def capacity_text(capacity: LoadCapacity) -> str:
    """"6 streams at 41.0 tok/s total" or "no concurrency within it": the figure that ranks, in words."""
    if capacity.streams is None or capacity.output_tok_s is None:
        return "no concurrency tested within it"
    streams = "stream" if capacity.streams == 1 else "streams"
    return f"{capacity.streams} {streams} at {capacity.output_tok_s:.1f} tok/s total"
