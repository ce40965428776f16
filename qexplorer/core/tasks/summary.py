"""Task accuracy across precisions: each one's accuracy with its Wilson interval, its recovery against the
reference precision, and the paired exact McNemar test against the reference and against its neighbour.

Two scores are paired only when they are of the same task on the same items in the same order
(``items_sha256``): then item i of one is item i of the other and McNemar's test uses only the items on which
they disagree (:mod:`.stats`). Neighbours are consecutive in the precision registry's order (widest first), among
the precisions that have the task. A difference that is not significant at α = 0.05 is said in words, with the
smallest difference these many items could have detected (power 0.8; the measured disagreement rate ψ where
the two disagree at all, else the conservative ψ = 0.5 before measuring).

:func:`verdicts` says per task whether it tells the precisions apart. Where no paired test is significant it
compares the best accuracy p with the smallest loss n items detect at ψ = 2p(1 − p): a model that scores less
than that is too weak for the task, and that is said instead of a ranking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qexplorer.core.domain.record import RunRecord, TaskScore
from qexplorer.core.precisions import BY_KEY
from qexplorer.core.tasks import stats

TITLES = {"humaneval": "HumanEval pass@1", "arith": "arithmetic-chain accuracy"}


def task_title(name: str) -> str:
    return TITLES.get(name, name)


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

    @property
    def length_accuracy(self) -> tuple[tuple[int, float], ...]:
        """arith: (chain length, fraction right) for each length measured."""
        return tuple((length, passed / n) for length, n, passed in self.per_length if n)


def compare_pair(candidate: TaskScore, other: TaskScore, against: str) -> PairedComparison | None:
    """The paired test of ``candidate`` against ``other``; None when they are not on the same items asked the same
    way (a chat template against a raw completion, or another token budget, differs for prompting's sake)."""
    if ((candidate.name, candidate.items_sha256, candidate.n, candidate.template, candidate.max_new_tokens)
            != (other.name, other.items_sha256, other.n, other.template, other.max_new_tokens)):
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


@dataclass(frozen=True)
class TaskVerdict:
    """What one task says about the precisions measured: which differences are real, or that it cannot tell."""

    task: str
    n: int
    tells_apart: bool  # at least one paired difference is significant
    text: str


def verdicts(rows: Sequence[TaskAccuracy]) -> tuple[TaskVerdict, ...]:
    """One sentence per task. Where no paired test is significant the task does not rank the precisions, and
    where even the best accuracy is below the smallest difference these items can detect, the model is too weak
    for the task: a loss could never be told from noise, so that is said instead of a ranking."""
    out = []
    for task in dict.fromkeys(r.task for r in rows):
        mine = [r for r in rows if r.task == task]
        tests = [(r, t) for r in mine for t in (r.versus_reference, r.versus_previous) if t is not None]
        n = max(r.n for r in mine)
        title = task_title(task)
        significant = [(r, t) for r, t in tests if t.significant]
        if significant:
            text = f"{title} tells precisions apart at {n} items: " + "; ".join(
                f"{_label(r.precision)} {t.difference:+.1%} against {_label(t.against)} (p = {t.p_value:.3g})"
                for r, t in significant) + "."
            out.append(TaskVerdict(task, n, True, text))
            continue
        # how far a precision could fall before n items notice: Connor's δ at the disagreement of two
        # independent models at the best accuracy p, ψ = 2p(1 − p), the most two positively correlated ones reach
        # (stats' note), or the disagreement measured where it is larger
        best = max((r.accuracy or 0.0) for r in mine)
        psi = max([2 * best * (1 - best), *(t.discordance_rate for _r, t in tests if t.b + t.c)])
        smallest = stats.detectable_difference(n, psi) if psi > 0 else None
        if not tests:
            text = f"{title}: one precision measured at {n} items; nothing to compare yet."
        elif smallest is None or best < smallest:
            limit = (f"{n} items cannot detect any difference" if smallest is None else
                     f"the smallest difference {n} items detect is {smallest:.1%}")
            text = (f"{title}: the model is too weak for this task to tell these precisions apart - the best "
                    f"scores {best:.1%}, and {limit}; no ranking by this task.")
        else:
            text = (f"{title}: no significant difference at {n} items between any two precisions compared "
                    f"(the smallest difference these items detect is {smallest:.1%}); no ranking by this task.")
        out.append(TaskVerdict(task, n, False, text))
    return tuple(out)


def _label(precision: str) -> str:
    known = BY_KEY.get(precision)
    return known.label if known else precision
