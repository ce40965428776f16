"""The parent's clock of one job's phases: what each phase cost, what ran beside what, and when a job stalls.

The worker announces each phase; the runner feeds this clock the announcements and a tick per loop. Time the
job spent stopped for another job's timed phase, or waiting for its own turn to run alone
(:mod:`.overlap`), is split off the phase it interrupted as :attr:`PhaseKind.WAITING`: it is never a
phase's cost, and it never counts as a stall (a job that waits longer than the phase timeout is not stuck).
A phase during which another job's worker ran is listed in :attr:`PhaseClock.shared`: its wall time was slowed
by that job, so the ETA learns no rate from it and the record says so.

The record's :class:`~qexplorer.core.domain.record.Timings` come from here (:func:`timings_from`), not from the
worker's own clock, which would include the pauses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from qexplorer.core.domain.phases import PhaseKind
from qexplorer.core.domain.record import Timings

MIN_WAIT_ROW_S = 0.05  # the runner loop's granularity: a shorter wait stays in its phase


@dataclass
class PhaseClock:
    timeout_s: float
    now: float
    phase: PhaseKind = PhaseKind.START
    phases: list[tuple[PhaseKind, float]] = field(default_factory=list)
    shared: list[PhaseKind] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.phase_started = self.last_activity = self.last_tick = self.now
        self.waiting_s = 0.0  # of the current phase

    def tick(self, now: float, *, waiting: bool, others_running: bool) -> None:
        """One loop of the runner: ``waiting`` while the job is stopped or waits for its turn, else whether
        another job's worker runs beside it."""
        if waiting:
            self.waiting_s += now - self.last_tick
            self.last_activity = now  # waiting makes no progress by design: not a stall
        elif others_running and self.phase not in self.shared:
            self.shared.append(self.phase)
        self.last_tick = now

    def activity(self, now: float) -> None:
        self.last_activity = now

    def enter(self, phase: PhaseKind, now: float) -> None:
        self.phases.extend(split_waiting(self.phase, now - self.phase_started, self.waiting_s))
        self.phase, self.phase_started, self.waiting_s = phase, now, 0.0
        self.last_activity = now

    def stalled(self, now: float) -> bool:
        return now - self.last_activity > self.timeout_s

    def close(self, now: float) -> tuple[tuple[PhaseKind, float], ...]:
        self.phases.extend(split_waiting(self.phase, now - self.phase_started, self.waiting_s))
        self.waiting_s, self.phase_started = 0.0, now
        return tuple(self.phases)


def split_waiting(phase: PhaseKind, seconds: float, waiting_s: float) -> list[tuple[PhaseKind, float]]:
    """A phase's wall time without the time it waited, which is listed on its own (not the phase's cost)."""
    waiting_s = min(waiting_s, seconds)
    if waiting_s <= MIN_WAIT_ROW_S:
        return [(phase, seconds)]
    return [(phase, seconds - waiting_s), (PhaseKind.WAITING, waiting_s)]


_QUANTIZE = (PhaseKind.DEQUANTIZE, PhaseKind.CONVERT, PhaseKind.QUANTIZE)


def timings_from(phases: Iterable[tuple[str, float]]) -> Timings:
    """The record's costs from the parent's clock, waiting excluded:

    * ``quantize_s``: making the artifact (dequantize, convert, quantize);
    * ``load_s``: the serving engine's start (vLLM's ``engine`` phase), else the first ``load``;
    * ``quality_s``: the artifact's own quality pass, with, beside vLLM, the ``load`` of the artifact for it (it
      runs before the engine starts); vLLM's log-prob cross-check is not the quality pass and is not in it. None
      where no quality pass ran (the reference precision's row comes from the reference itself);
    * ``tasks_s``: the task pass (generation and scoring), None where none ran.
    """
    phases = [(PhaseKind(name), seconds) for name, seconds in phases]

    def total(selected: list[float]) -> float | None:
        return sum(selected) if selected else None

    engine = [s for k, s in phases if k == PhaseKind.ENGINE]
    loads = [s for k, s in phases if k == PhaseKind.LOAD]
    quality = [s for k, s in phases if k == PhaseKind.QUALITY]
    if engine:
        quality += loads
    return Timings(quantize_s=total([s for k, s in phases if k in _QUANTIZE]),
                   load_s=total(engine or loads[:1]), quality_s=total(quality),
                   tasks_s=total([s for k, s in phases if k == PhaseKind.TASKS]))
