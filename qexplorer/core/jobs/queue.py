"""The job queue: headless, owned by core, consumed by one thread.

:class:`JobQueue` holds every job of a session (queued, running, finished),
runs them one at a time through a :class:`~qexplorer.core.jobs.runner.JobRunner`
(which owns the memory guard), stores what they produce, and reports every
change as a frozen :class:`JobView` through ``on_change``. It is the only
object that mutates job state; the app and the CLI read views.

One consumer at a time, without a missed wake-up: the consumer's last look at
the queue ("nothing queued") and its "I am done" happen in one locked step in
:meth:`_take`, and :meth:`submit` checks "is a consumer active?" under the same
lock, starting one (``start_consumer``: the app's thread worker) if not. A job
submitted while the consumer finishes is therefore either seen by its last
look or starts a new consumer. (The app's queue used to clear its "running"
flag after its last look, outside any lock: a job queued in between stayed
queued forever.) The CLI calls :meth:`drain` itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from qexplorer.core.domain.events import Failed, JobEvent, Log, Metric, Phase, Progress
from qexplorer.core.domain.phases import PhaseKind, spec_of
from qexplorer.core.domain.record import ExportRecord, RunRecord
from qexplorer.core.domain.spec import JobSpec, ServerSpec
from qexplorer.core.errors import UserError
from qexplorer.core.eta import DurationBook, JobEstimate
from qexplorer.core.jobs.overlap import MAX_WORKERS, PREPARE_THREADS, fits_on_card, fits_together
from qexplorer.core.jobs.runner import JobOutcome, JobRunner, failure_record
from qexplorer.core.jobs.watch import GPU_BY_DELTA, MemorySample
from qexplorer.core.kinds import Engine, JobAction, JobStatus
from qexplorer.core.results import ResultsStore

MAX_MEMORY_SAMPLES = 3600  # an hour at 1 Hz per job; older samples drop off the front


@dataclass(frozen=True)
class JobView:
    """A job as the UI and the CLI see it at one moment."""

    id: int
    label: str
    action: JobAction
    status: JobStatus = JobStatus.QUEUED
    phase: str = ""
    message: str = ""
    done: float = 0.0
    total: float = 0.0
    warnings: tuple[str, ...] = ()
    metrics: tuple[Metric, ...] = ()
    memory: tuple[MemorySample, ...] = ()
    planned_peak_bytes: int | None = None
    error: str | None = None
    record: RunRecord | None = None
    export: ExportRecord | None = None
    stored_id: int | None = None  # the results-store row this job wrote
    store_error: str | None = None
    log_path: str | None = None
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int | None = None
    revision: int = 0  # queue-wide and increasing: a reader keeps the newest view of each job
    estimate: JobEstimate | None = None  # before it ran: per phase, from this machine's earlier jobs or defaults
    phase_started_s: float | None = None  # time.monotonic() when the current phase began
    took_s: float | None = None  # once finished: the sum of its phases, seen from the parent

    @property
    def measuring_now(self) -> bool:
        """In a phase that runs alone (or waiting to start one): a figure is being timed, and a front end that
        shares the machine goes quiet (domain.phases)."""
        return self.status == JobStatus.RUNNING and spec_of(self.phase).alone

    def left_s(self, now: float) -> float | None:
        """Estimated seconds left: all of it while queued, the rest of the current and later phases while it runs,
        none once finished; None without an estimate."""
        if self.estimate is None:
            return None
        if self.finished:
            return 0.0
        if self.status == JobStatus.QUEUED or self.phase_started_s is None:
            return self.estimate.total_s
        return self.estimate.left_s(self.phase or PhaseKind.START, now - self.phase_started_s)

    @property
    def finished(self) -> bool:
        return self.status.finished

    def applied(self, event: JobEvent) -> JobView:
        """This view after one worker event."""
        if isinstance(event, Phase):
            return replace(self, status=JobStatus.RUNNING, phase=event.name, message=event.message or event.name,
                           done=0.0, total=0.0, phase_started_s=time.monotonic())
        if isinstance(event, Progress):
            return replace(self, done=event.done, total=event.total, message=event.message or self.message)
        if isinstance(event, Log):
            warnings = self.warnings + (event.message,) if event.is_warning else self.warnings
            return replace(self, message=event.message, warnings=warnings)
        if isinstance(event, Metric):
            kept = tuple(m for m in self.metrics if m.name != event.name)
            return replace(self, metrics=kept + (event,))
        if isinstance(event, Failed):
            return replace(self, message=event.message)
        return self

    def sampled(self, sample: MemorySample) -> JobView:
        return replace(self, memory=(self.memory + (sample,))[-MAX_MEMORY_SAMPLES:],
                       peak_rss_bytes=max(self.peak_rss_bytes, sample.rss_bytes),
                       peak_gpu_bytes=self.peak_gpu_bytes if sample.gpu_bytes is None
                       else max(self.peak_gpu_bytes or 0, sample.gpu_bytes))


class JobQueue:
    def __init__(self, runner: JobRunner, store: ResultsStore | None,
                 on_change: Callable[[JobView], None] | None = None,
                 server_runner: Callable[[ServerSpec, Callable[[JobEvent], None]], RunRecord] | None = None,
                 start_consumer: Callable[[], None] | None = None, overlap: bool = False) -> None:
        self.runner = runner
        # two workers at once, timed phases alone (jobs.overlap); off: strictly one job after the other
        self.overlap = overlap
        self._wake = threading.Event()  # a job finished or was submitted: the consumer looks again
        self.store = store
        self.on_change = on_change or (lambda view: None)
        self.server_runner = server_runner
        self.start_consumer = start_consumer
        self._lock = threading.Lock()
        self._consuming = False
        self._views: dict[int, JobView] = {}
        self._specs: dict[int, JobSpec | ServerSpec] = {}
        self._cancels: dict[int, threading.Event] = {}
        self._next_id = 1
        self._revision = 0

    # ---------------------------------------------------------------- producers
    def submit(self, specs: Iterable[JobSpec | ServerSpec], labels: Iterable[str] | None = None,
               estimates: Iterable[JobEstimate | None] | None = None) -> tuple[int, ...]:
        specs = list(specs)
        names = list(labels) if labels is not None else [_label(s) for s in specs]
        guesses = list(estimates) if estimates is not None else [None] * len(specs)
        added = []
        with self._lock:
            for spec, label, estimate in zip(specs, names, guesses, strict=True):
                job_id = self._next_id
                self._next_id += 1
                action = JobAction.SERVER if isinstance(spec, ServerSpec) else spec.action
                view = JobView(id=job_id, label=label, action=action,
                               planned_peak_bytes=getattr(spec, "planned_peak_bytes", None), estimate=estimate)
                view = self._set(view)
                self._specs[job_id] = spec
                self._cancels[job_id] = threading.Event()
                added.append(view)
            start = self.start_consumer is not None and bool(added) and not self._consuming
            if start:
                self._consuming = True
        for view in added:
            self.on_change(view)
        self._wake.set()
        if start:
            assert self.start_consumer is not None
            self.start_consumer()
        return tuple(v.id for v in added)

    def cancel(self, job_id: int) -> None:
        with self._lock:
            view = self._views.get(job_id)
            if view is None or view.finished:
                return
            self._cancels[job_id].set()
            if view.status == JobStatus.QUEUED:
                view = self._set(replace(view, status=JobStatus.CANCELLED, message="Cancelled before it started."))
            else:
                view = None
        if view is not None:
            self.on_change(view)

    def cancel_all(self) -> None:
        for job_id in list(self._views):
            self.cancel(job_id)

    # ---------------------------------------------------------------- readers
    def views(self) -> tuple[JobView, ...]:
        with self._lock:
            return tuple(self._views.values())

    def view(self, job_id: int) -> JobView | None:
        with self._lock:
            return self._views.get(job_id)

    # ---------------------------------------------------------------- consumers
    def drain(self) -> None:
        """Run queued jobs until none is left: the consumer (the app's thread worker, or the CLI itself). With
        ``overlap`` the next job starts beside the running one when both fit in memory; the runner's gate keeps
        every timed phase alone."""
        running: dict[int, threading.Thread] = {}
        try:
            while True:
                for job_id in [j for j, thread in running.items() if not thread.is_alive()]:
                    running.pop(job_id).join()
                self._wake.clear()
                taken = self._take(may_finish=not running, allowed=lambda spec: self._may_start(spec, running))
                if taken is None:
                    if not running:
                        return
                    self._wake.wait(0.25)
                    continue
                if not self.overlap:
                    self._run(*taken)
                    continue
                job_id, spec = taken
                if running and isinstance(spec, JobSpec):  # beside a measuring job: prepare on one thread
                    spec = replace(spec, prepare_threads=PREPARE_THREADS)
                thread = threading.Thread(target=self._run_then_wake, args=(job_id, spec), name=f"job-{job_id}",
                                          daemon=True)
                running[job_id] = thread
                thread.start()
        except BaseException:  # Ctrl-C in the CLI (raised here, in the consumer): stop the jobs still running
            for job_id in running:
                self._cancels[job_id].set()
            raise
        finally:
            for thread in running.values():
                thread.join()
            with self._lock:
                self._consuming = False

    def _run_then_wake(self, job_id: int, spec: JobSpec | ServerSpec) -> None:
        try:
            self._run(job_id, spec)
        finally:
            self._wake.set()

    def _may_start(self, spec: JobSpec | ServerSpec, running: dict[int, threading.Thread]) -> bool:
        """Under the lock: whether ``spec`` may start now beside what runs. At most ``MAX_WORKERS`` jobs; a
        server benchmark (all of it timed) only alone; every planned peak together within the live headroom."""
        if not running:
            return True
        if len(running) >= MAX_WORKERS or isinstance(spec, ServerSpec):
            return False
        others = [self._specs[j] for j in running]
        if any(isinstance(o, ServerSpec) for o in others):
            return False
        views = [self._views[j] for j in running]
        if any(spec_of(v.phase).shared_work for v in views):
            return False  # the shared BF16 checkpoint / reference is being built: on all threads, by that job
        latest = [v.memory[-1] for v in views if v.memory]
        if len(latest) != len(views) or any(m.headroom_bytes is None for m in latest):
            return False  # no live headroom to plan against: one at a time
        if any(m.gpu_source == GPU_BY_DELTA for m in latest):
            return False  # GPU memory read as the device's growth would count both jobs as each one's
        headroom = sum(m.rss_bytes for m in latest) + min(int(m.headroom_bytes or 0) for m in latest)
        if not fits_together([getattr(o, "planned_peak_bytes", None) for o in others] + [spec.planned_peak_bytes],
                             headroom):
            return False
        vram_free = [m.vram_free_bytes for m in latest if m.vram_free_bytes is not None]
        return fits_on_card([getattr(o, "planned_gpu_bytes", None) for o in others], [m.gpu_bytes for m in latest],
                            spec.planned_gpu_bytes, min(vram_free) if vram_free else None)

    def _take(self, may_finish: bool = True,
              allowed: Callable[[JobSpec | ServerSpec], bool] = lambda spec: True,
              ) -> tuple[int, JobSpec | ServerSpec] | None:
        """The oldest queued job, marked running; or None - and, when ``may_finish``, this consumer is done - in
        one locked step. None as well while ``allowed`` says the oldest job must wait."""
        with self._lock:
            job_id = self._first_queued()
            if job_id is None:
                if may_finish:
                    self._consuming = False
                return None
            if not allowed(self._specs[job_id]):
                return None
            self._consuming = True
            view = self._set(replace(self._views[job_id], status=JobStatus.RUNNING, message="starting",
                                     phase=PhaseKind.START, phase_started_s=time.monotonic()))
            spec = self._specs[job_id]
        self.on_change(view)
        return job_id, spec

    def _first_queued(self) -> int | None:
        return next((v.id for v in self._views.values() if v.status == JobStatus.QUEUED), None)

    def _set(self, view: JobView) -> JobView:
        self._revision += 1
        view = replace(view, revision=self._revision)
        self._views[view.id] = view
        return view

    def _update(self, job_id: int, change: Callable[[JobView], JobView]) -> None:
        with self._lock:
            view = self._set(change(self._views[job_id]))
        self.on_change(view)

    def _run(self, job_id: int, spec: JobSpec | ServerSpec) -> None:
        try:
            if isinstance(spec, ServerSpec):
                self._run_server(job_id, spec)
            else:
                self._run_job(job_id, spec)
        except Exception as exc:  # a bug here must not leave the job "running" or stop the queue
            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            self._update(job_id, lambda v: replace(v, status=JobStatus.FAILED, error=message, message=message))

    def _run_job(self, job_id: int, spec: JobSpec) -> None:
        outcome = self.runner.run(
            spec, cancel=self._cancels[job_id],
            on_event=lambda event: self._update(job_id, lambda v: v.applied(event)),
            on_memory=lambda sample: self._update(job_id, lambda v: v.sampled(sample)),
        )
        stored_id, store_error = None, None
        reused_from = outcome.record.reused_from if outcome.ok and outcome.record is not None else None
        if reused_from is not None:
            stored_id = reused_from  # an earlier measurement shown again: its row is already in the store
        elif spec.action == JobAction.RUN and self.store is not None:
            try:
                stored_id = store_outcome(self.store, outcome)
            except UserError as exc:
                store_error = str(exc)
        estimate = self.view(job_id).estimate
        if outcome.ok and reused_from is None and estimate is not None and outcome.phase_seconds:
            try:  # predicted vs actual, so that the next estimate starts from this machine's rates
                # a phase that ran beside another job learns nothing about this machine's rate for it alone, and a
                # job timed while other processes were busy teaches no rate at all (its entry is kept)
                shared = set(outcome.record.shared_phases) if outcome.record is not None else set()
                if outcome.record is not None and outcome.record.busy_host:
                    shared |= {name for name, _ in outcome.phase_seconds}
                shared |= cut_short(outcome.record)
                DurationBook.in_dir(spec.data_dir).record(estimate, outcome.phase_seconds, skip=shared)
                _learn_vllm_overhead(spec.data_dir, outcome.record)
            except OSError as exc:
                store_error = store_error or f"the durations file could not be written ({exc})"
        self._update(job_id, lambda v: _finished(v, outcome, stored_id, store_error))

    def _run_server(self, job_id: int, spec: ServerSpec) -> None:
        if self.server_runner is None:
            raise RuntimeError("this queue has no server runner")
        record, error, stored_id = None, None, None
        try:
            record = self.server_runner(spec, lambda event: self._update(job_id, lambda v: v.applied(event)))
            error = record.server.error if record.server else None
            if self.store is not None and record.server and record.server.levels:
                stored_id = self.store.add(record)
        except UserError as exc:
            error = str(exc)
        status = JobStatus.OK if error is None else JobStatus.FAILED
        message = error or "stored; it appears on the compare screen (c)"
        self._update(job_id, lambda v: replace(v, status=status, error=error, record=record, stored_id=stored_id,
                                               phase="done" if error is None else v.phase, message=message))


def _finished(view: JobView, outcome: JobOutcome, stored_id: int | None, store_error: str | None) -> JobView:
    if outcome.ok and outcome.export is not None:
        message = f"serve it with: {outcome.export.serve_command}"
    elif outcome.ok and outcome.record is not None and outcome.record.reused_from is not None:
        message = (f"reused: result #{outcome.record.reused_from}, measured {outcome.record.reused_measured_at}, "
                   "with the same artifact, engine and settings")
    elif outcome.ok:
        message = "stored; it appears on the compare screen (c)"
    else:
        message = outcome.error or outcome.status
    return replace(view, status=outcome.status, phase="done" if outcome.ok else view.phase, message=message,
                   error=outcome.error, record=outcome.record, export=outcome.export, stored_id=stored_id,
                   store_error=store_error, log_path=str(outcome.log_path) if outcome.log_path else None,
                   peak_rss_bytes=max(view.peak_rss_bytes, outcome.peak_rss_bytes),
                   peak_gpu_bytes=outcome.peak_gpu_bytes if outcome.peak_gpu_bytes is not None else view.peak_gpu_bytes,
                   done=1.0 if outcome.ok else view.done, total=1.0 if outcome.ok else view.total,
                   took_s=sum(s for _, s in outcome.phase_seconds) if outcome.phase_seconds else None)


def store_outcome(store: ResultsStore, outcome: JobOutcome) -> int:
    """Keep every finished job: results with their metrics, failures with their reason."""
    if outcome.ok and outcome.record is not None:
        return store.add(outcome.record, status=JobStatus.OK)
    return store.add(failure_record(outcome), status=outcome.status, error=outcome.error)


def _label(spec: JobSpec | ServerSpec) -> str:
    if isinstance(spec, ServerSpec):
        from urllib.parse import urlparse

        return f"server {urlparse(spec.url).netloc or spec.url}"
    from qexplorer.core.precisions import BY_KEY

    precision = BY_KEY.get(spec.precision)
    label = (precision.label if precision else spec.precision) + (" (quick)" if spec.first_pass else "")
    return f"export {label}" if spec.action == JobAction.EXPORT else label


def _learn_vllm_overhead(data_dir: str, record: RunRecord | None) -> None:
    """A vLLM job on a real GPU refits the planner's vLLM overhead for that GPU (GB10's default is a field
    report's; the first runs here replace it)."""
    from qexplorer.core.serving.vllm_launch import OVERHEAD_KEY, measured_overhead

    if record is None or record.engine.name != Engine.VLLM or record.engine.device != "cuda" or not record.hardware:
        return
    memory = record.memory
    overhead = measured_overhead(memory.server_gpu_bytes, memory.weight_bytes, memory.kv_cache_bytes)
    if overhead is not None and record.hardware.gpu:
        DurationBook.in_dir(data_dir).learn_bytes(OVERHEAD_KEY, record.hardware.gpu, overhead)


def cut_short(record: RunRecord | None) -> set[str]:
    """Phases that did not do the work their estimate counted - a task pass that failed, a load sweep that
    failed, was not run or stopped early - and so teach the ETA no rate."""
    if record is None:
        return set()
    short = {str(PhaseKind.TASKS)} if record.task_error else set()
    sweep = record.server
    if sweep is None or sweep.error or sweep.stopped_early or not sweep.levels:
        short.add(str(PhaseKind.LOAD_SWEEP))
    return short
