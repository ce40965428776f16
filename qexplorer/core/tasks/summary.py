"""Task accuracy across precisions: each one's accuracy with its Wilson interval, its recovery against the
reference precision, and the paired exact McNemar test against the reference and against its neighbour.

Two scores are paired only when they are of the same task on the same items in the same order
(``items_sha256``): then item i of one is item i of the other and McNemar's test uses only the items on which
they disagree (:mod:`.stats`). Neighbours are consecutive in the precision registry's order (widest first), among
the precisions that have the task. A difference that is not significant at α = 0.05 is said in words, with the
smallest difference these many items could have detected (power 0.8; the measured disagreement rate ψ where
the two disagree at all, else the conservative ψ = 0.5 before measuring).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qexplorer.core.domain.record import RunRecord, TaskScore
from qexplorer.core.precisions import BY_KEY
from qexplorer.core.tasks import stats


@dataclass(frozen=True)
class PairedComparison:
    """This precision against another on the same items: b = the other right and this one wrong, c = the reverse."""

    against: str  # the other precision
    b: int
    c: int
    n: int
    p_value: float  # exact two-sided McNemar
    difference: float | None  # this accuracy minus the other's, (c − b) / n
    detectable_difference: float | None  # the smallest difference n items detect (α 0.05, power 0.8)
    discordance_rate: float  # ψ used for it: measured, or UNKNOWN_DISCORDANCE where the two never disagree
    significant: bool
    verdict: str  # "no significant difference at N items", or the difference and its p-value


@dataclass(frozen=True)
class TaskAccuracy:
    precision: str
    task: str
    engine: str
    template: str
    n: int
    passed: int
    accuracy: float | None
    low: float  # Wilson 95 % interval
    high: float
    recovery: float | None  # accuracy ÷ the reference precision's (None: no reference score or it got none right)
    versus_reference: PairedComparison | None
    versus_previous: PairedComparison | None  # the neighbour above it in the registry's order
    per_length: tuple[tuple[int, int, int], ...] = ()  # arith: (length, n, passed)


def compare_pair(candidate: TaskScore, other: TaskScore, against: str) -> PairedComparison | None:
    """The paired test of ``candidate`` against ``other``; None when they are not on the same items."""
    if (candidate.name, candidate.items_sha256, candidate.n) != (other.name, other.items_sha256, other.n):
        return None
    test = stats.paired_test(other.outcomes, candidate.outcomes)
    psi = test.discordance_rate or stats.UNKNOWN_DISCORDANCE
    detectable = stats.detectable_difference(test.n, psi)
    significant = test.p_value < stats.ALPHA
    if significant:
        verdict = f"{test.difference:+.1%} (p = {test.p_value:.3g}, {test.b + test.c} items disagree)"
    else:
        verdict = f"no significant difference at {test.n} items"
    return PairedComparison(against=against, b=test.b, c=test.c, n=test.n, p_value=test.p_value,
                            difference=test.difference, detectable_difference=detectable, discordance_rate=psi,
                            significant=significant, verdict=verdict)


def _order(precision: str) -> int:
    keys = list(BY_KEY)
    return keys.index(precision) if precision in keys else len(keys)


def summarize(records: Sequence[RunRecord], reference_precision: str = "bf16") -> tuple[TaskAccuracy, ...]:
    """One row per precision and task, precisions in the registry's order, tasks in the order measured. Where a
    precision appears twice the last record wins (the newest, when ``records`` are oldest first)."""
    latest: dict[str, RunRecord] = {}
    for record in records:
        if record.tasks:
            latest[record.precision] = record
    ordered = sorted(latest.values(), key=lambda r: _order(r.precision))
    reference = latest.get(reference_precision)
    rows = []
    previous: dict[str, tuple[str, TaskScore]] = {}
    for record in ordered:
        for score in record.tasks:
            interval = stats.wilson(score.passed, score.n)
            ref_score = next((t for t in reference.tasks if t.name == score.name), None) if reference else None
            is_reference = record.precision == reference_precision
            versus_reference = (compare_pair(score, ref_score, reference_precision)
                                if ref_score is not None and not is_reference else None)
            recovery = (stats.recovery(interval, stats.wilson(ref_score.passed, ref_score.n))
                        if ref_score is not None and ref_score.items_sha256 == score.items_sha256 else None)
            before = previous.get(score.name)
            versus_previous = compare_pair(score, before[1], before[0]) if before is not None else None
            previous[score.name] = (record.precision, score)
            rows.append(TaskAccuracy(
                precision=record.precision, task=score.name, engine=score.engine, template=score.template,
                n=score.n, passed=score.passed, accuracy=interval.fraction, low=interval.low, high=interval.high,
                recovery=recovery, versus_reference=versus_reference, versus_previous=versus_previous,
                per_length=tuple((a.length, a.n, a.passed) for a in score.per_length)))
    return tuple(rows)
