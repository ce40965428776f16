"""Every phase a job can be in, and every rule that depends on which one it is.

This is the only module that spells a phase's name. The worker announces a
phase with ``Phase(PhaseKind.X)``; the runner, the gate, the guard, the queue,
the ETA and the reuse rule read what they need from :data:`PHASES`:

==============  =====  =====  ======  ======  ===================================
phase           timed  alone  shared  guard   ETA unit
==============  =====  =====  ======  ======  ===================================
start                                 fast    per job
dequantize                    yes     fast    GiB of BF16 weights
reference                     yes     fast    billion active parameter-tokens
convert                       yes     fast    GiB of BF16 weights
quantize                              fast    GiB of BF16 weights
load                                  fast    GiB of the artifact
engine                                fast    per job (one vLLM start)
benchmark       yes    yes            user    GiB-tokens (tokens timed × GiB read)
tasks                                 fast    GiB-tokens (tokens the task pass may generate × GiB read)
load-sweep      yes    yes            user    GiB-tokens (tokens the load sweep processes × GiB read)
log-probs                             fast    billion active parameter-tokens
quality                               fast    billion active parameter-tokens
calibrate       yes    yes            user    per job (the bandwidth copy test)
export                                fast    GiB of the artifact
server          yes                   user    — (bench-server: no worker)
server-quality                        fast    — (bench-server's log-prob pass)
waiting                               —       — (the parent's: paused or waiting)
==============  =====  =====  ======  ======  ===================================

* **timed**: the phase's wall time is a figure (a speed, a bandwidth).
* **alone**: it runs with every other worker stopped (SIGSTOP, :mod:`.overlap`);
  the worker announces it and waits for the parent's go before it starts the
  clock. ``server`` is timed but has no worker to pause.
* **shared**: work every job of a model shares, built once under a lock; the
  next job starts only once the running one is past it (:mod:`.queue`).
* **guard**: the memory guard samples at 4 Hz (``fast``) while memory moves, and
  at the user's rate while a timed phase runs, so that the parent stays quiet.
* **waiting** is not a worker phase: it is the time a job spent stopped for
  another job's timed phase or waiting for its own turn, split off the phase it
  interrupted so that it is never counted as that phase's cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class PhaseKind(StrEnum):
    START = "start"
    DEQUANTIZE = "dequantize"
    REFERENCE = "reference"
    CONVERT = "convert"
    QUANTIZE = "quantize"
    LOAD = "load"
    ENGINE = "engine"
    BENCHMARK = "benchmark"
    TASKS = "tasks"
    LOAD_SWEEP = "load-sweep"
    LOG_PROBS = "log-probs"
    QUALITY = "quality"
    CALIBRATE = "calibrate"
    EXPORT = "export"
    SERVER = "server"
    SERVER_QUALITY = "server-quality"
    WAITING = "waiting"


class GuardRate(StrEnum):
    FAST = "fast"  # 4 Hz: memory moves (loading, quantizing, a server starting)
    USER = "user"  # the user's interval: a timed phase, where a busy parent would perturb the figure


class EtaUnit(StrEnum):
    JOB = "per job"
    BF16_GIB = "GiB of BF16 weights"
    ARTIFACT_GIB = "GiB of the artifact"
    PARAM_TOKENS = "billion active parameter-tokens"
    GIB_TOKENS = "GiB-tokens (tokens timed × GiB read per token)"
    TASK_GIB_TOKENS = "GiB-tokens (tokens the task pass may generate × GiB read per token)"
    LOAD_GIB_TOKENS = "GiB-tokens (tokens the load sweep has the server process × GiB read per token)"
    NONE = "not estimated"


@dataclass(frozen=True)
class PhaseSpec:
    kind: PhaseKind
    timed: bool = False
    alone: bool = False
    shared_work: bool = False
    guard: GuardRate = GuardRate.FAST
    eta_unit: EtaUnit = EtaUnit.NONE
    in_job_peak: bool = True  # calibrate's copy buffers are the test's, not the job's memory


PHASES: dict[PhaseKind, PhaseSpec] = {spec.kind: spec for spec in (
    PhaseSpec(PhaseKind.START, shared_work=True, eta_unit=EtaUnit.ARTIFACT_GIB),  # hashing a new artifact
    PhaseSpec(PhaseKind.DEQUANTIZE, shared_work=True, eta_unit=EtaUnit.BF16_GIB),
    PhaseSpec(PhaseKind.REFERENCE, shared_work=True, eta_unit=EtaUnit.PARAM_TOKENS),
    PhaseSpec(PhaseKind.CONVERT, shared_work=True, eta_unit=EtaUnit.BF16_GIB),
    PhaseSpec(PhaseKind.QUANTIZE, eta_unit=EtaUnit.BF16_GIB),
    PhaseSpec(PhaseKind.LOAD, eta_unit=EtaUnit.ARTIFACT_GIB),
    PhaseSpec(PhaseKind.ENGINE, eta_unit=EtaUnit.ARTIFACT_GIB),  # a start, then the weights
    PhaseSpec(PhaseKind.BENCHMARK, timed=True, alone=True, guard=GuardRate.USER, eta_unit=EtaUnit.GIB_TOKENS),
    # untimed: its figure is an accuracy, not a speed, so it shares the machine like any preparation
    PhaseSpec(PhaseKind.TASKS, eta_unit=EtaUnit.TASK_GIB_TOKENS),
    # latency under load is a timing: it runs alone, like the benchmark
    PhaseSpec(PhaseKind.LOAD_SWEEP, timed=True, alone=True, guard=GuardRate.USER, eta_unit=EtaUnit.LOAD_GIB_TOKENS),
    PhaseSpec(PhaseKind.LOG_PROBS, eta_unit=EtaUnit.PARAM_TOKENS),
    PhaseSpec(PhaseKind.QUALITY, eta_unit=EtaUnit.PARAM_TOKENS),
    PhaseSpec(PhaseKind.CALIBRATE, timed=True, alone=True, guard=GuardRate.USER, eta_unit=EtaUnit.JOB,
              in_job_peak=False),
    PhaseSpec(PhaseKind.EXPORT, eta_unit=EtaUnit.ARTIFACT_GIB),
    PhaseSpec(PhaseKind.SERVER, timed=True, guard=GuardRate.USER),
    PhaseSpec(PhaseKind.SERVER_QUALITY),
    PhaseSpec(PhaseKind.WAITING, guard=GuardRate.USER),
)}

TIMED = frozenset(k for k, s in PHASES.items() if s.timed)
ALONE = frozenset(k for k, s in PHASES.items() if s.alone)
SHARED_WORK = frozenset(k for k, s in PHASES.items() if s.shared_work)


def spec_of(name: str) -> PhaseSpec:
    """The rules of a phase by its wire name; a name this build does not know (a newer worker) is an untimed
    phase sampled fast, the safe reading for every rule."""
    try:
        return PHASES[PhaseKind(name)]
    except ValueError:
        return _UNKNOWN


_UNKNOWN = PhaseSpec(PhaseKind.LOAD)
