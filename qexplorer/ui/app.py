"""The Textual app and its factory, used by the CLI and the tests alike."""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from textual import on, work
from textual.app import App
from textual.binding import Binding
from textual.reactive import reactive
from textual.timer import Timer
from textual.worker import Worker, WorkerState

from qexplorer.core.catalog import DEFAULT_ALIAS, CatalogEntry
from qexplorer.core.errors import UserError
from qexplorer.core.kinds import JobStatus
from qexplorer.core.model import ModelSpec
from qexplorer.core.session import RunOptions
from qexplorer.core.settings import Settings
from qexplorer.core.telemetry import TelemetrySnapshot
from qexplorer.core.units import format_bytes
from qexplorer.ui.messages import CatalogScanned, JobChanged, MachineSampled, ResultsLoaded, TelemetrySampled
from qexplorer.ui.screens.dashboard import DashboardScreen
from qexplorer.ui.sources import Sources
from qexplorer.ui.themes import DEFAULT_THEME, load_themes

if TYPE_CHECKING:  # the job machinery and compare rows load with the first job / the compare screen
    from qexplorer.core.compare import CompareRow
    from qexplorer.core.jobs.queue import JobView

HISTORY_SAMPLES = 600  # 10 minutes at the default 1 s


class QExplorerApp(App[int]):
    CSS_PATH = Path(__file__).parent / "app.tcss"
    TITLE = "qexplorer"
    BINDINGS = [
        Binding("question_mark", "help", "Help"),
        Binding("d", "dashboard", "Dashboard", show=False),
        Binding("m", "models", "Models"),
        Binding("p", "plan", "Plan"),
        Binding("j", "run_screen", "Jobs", show=False),
        Binding("c", "compare", "Compare"),
        Binding("q", "quit", "Quit"),
    ]
    DEFAULT_PRECISIONS = frozenset({"bf16", "int8", "q8_0", "q4_k_m"})

    snapshot: reactive[TelemetrySnapshot | None] = reactive(None, always_update=True)
    refresh_s: reactive[float] = reactive(1.0)
    paused: reactive[bool] = reactive(False)
    catalog_entries: reactive[tuple[CatalogEntry, ...]] = reactive(())
    catalog_scanning: reactive[bool] = reactive(True)
    model: reactive[ModelSpec | None] = reactive(None)
    context: reactive[int] = reactive(4096)
    kv_dtype: reactive[str] = reactive("f16")
    chosen: reactive[frozenset[str]] = reactive(DEFAULT_PRECISIONS)
    quick_bench: reactive[bool] = reactive(False)
    bench_depths: reactive[tuple[int, ...]] = reactive((0,))  # llama-bench -d for the jobs queued next
    measure_quality: reactive[bool] = reactive(True)
    remeasure: reactive[bool] = reactive(False)  # False: a stored result with the same key is shown again (reuse)
    measure_tasks: reactive[bool] = reactive(False)  # the task pass after each full benchmark (core.tasks.run)
    measure_load: reactive[bool] = reactive(False)  # the load sweep after each full benchmark (issue 25)
    jobs: reactive[tuple[JobView, ...]] = reactive(())  # the queue's latest view of each job, oldest first
    compare_rows: reactive[tuple[CompareRow, ...]] = reactive(())  # measured results for the compare screen
    quiet: reactive[bool] = reactive(False)  # a job is timed now: screens leave their plots (ui.screens.live)
    # the run options the plan screen's keys do not toggle (corpus, reference, tokens, threads, engine args, ...):
    # set in the options dialog (o); every option `qexplorer run` has
    run_extras: reactive[RunOptions] = reactive(RunOptions, always_update=True)

    def __init__(self, settings: Settings, sources: Sources, *, dashboard_only: bool = False,
                 live: bool = True, model_ref: str = DEFAULT_ALIAS) -> None:
        super().__init__()
        self.model_ref = model_ref
        self.settings = settings
        self.sources = sources
        self.dashboard_only = dashboard_only
        self.live = live
        self.history: deque[TelemetrySnapshot] = deque(maxlen=HISTORY_SAMPLES)
        self.machine_snapshot: TelemetrySnapshot | None = None  # the real machine's, when the screens simulate
        self.clock = time.monotonic  # the jobs screen's "time left"; tests fix it
        self._estimated: tuple[tuple, tuple] | None = None  # planned_jobs' last estimates and what they depend on
        self._shown_estimated: tuple[tuple, tuple] | None = None  # the same under --simulate, for the shown device
        self._timer: Timer | None = None
        self._job_queue = None  # created with the first job: the job machinery stays out of start-up
        self.results_error: str | None = None
        self._theme_problems: tuple[str, ...] = ()
        self.set_reactive(QExplorerApp.refresh_s, settings.refresh_s)
        self.set_reactive(QExplorerApp.context, settings.default_context)
        self._register_themes(settings.theme)
        self.sub_title = "dashboard" if dashboard_only else "choose how to quantize"

    # ------------------------------------------------------------------ themes
    def _register_themes(self, wanted: str) -> None:
        loaded = load_themes()
        for theme in loaded.themes:
            self.register_theme(theme)
        problems = list(loaded.problems)
        if os.environ.get("NO_COLOR"):
            wanted = "ansi-dark"  # the terminal's own palette; Textual drops colour itself
        if wanted not in self.available_themes:
            problems.append(f"Theme {wanted!r} is not installed; using {DEFAULT_THEME}.")
            wanted = DEFAULT_THEME if DEFAULT_THEME in self.available_themes else "textual-dark"
        self.theme = wanted
        self._theme_problems = tuple(problems)

    # ------------------------------------------------------------------ lifecycle
    def on_mount(self) -> None:
        self.theme_changed_signal.subscribe(self, lambda theme: self._persist_theme(theme.name))
        self.push_screen(DashboardScreen())
        for problem in self._theme_problems:
            self.notify(problem, severity="warning", timeout=8)
        if not self.dashboard_only:
            # Model discovery imports gguf/numpy in its thread; it waits until the first frame is out.
            self.call_after_refresh(lambda: self.set_timer(0.3, self._scan_catalog))
        if self.live:
            # The first sample waits for the first frame: NVML start-up and the
            # process walk would otherwise compete with it for the GIL.
            self.call_after_refresh(self.request_sample)
            self._timer = self.set_interval(self.refresh_s, self.request_sample)
            if not self.dashboard_only:
                self.call_after_refresh(lambda: self.set_timer(1.0, self._calibrate))

    def on_unmount(self) -> None:
        if self._job_queue is not None:
            self._job_queue.cancel_all()
        self.sources.sampler.close()
        if self.sources.separate_guard:
            self.sources.guard.close()

    def _persist_theme(self, theme_name: str) -> None:
        """A theme picked in the command palette is remembered in the settings file."""
        if theme_name == self.settings.theme or os.environ.get("NO_COLOR"):
            return
        from qexplorer.core.settings import save_setting

        try:
            save_setting("theme", theme_name)
        except OSError as exc:
            self.notify(f"Could not save the theme setting ({exc}).", severity="warning")

    def watch_refresh_s(self, refresh_s: float) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = self.set_interval(refresh_s, self.request_sample)

    # ------------------------------------------------------------------ sampling
    def request_sample(self) -> None:
        """Timer tick: ask a thread for a sample; never sample on the event loop."""
        if self.paused:
            return
        if any(w.group == "telemetry" and w.is_running for w in self.workers):
            return  # the previous sample is still being read
        self._sample()

    @work(thread=True, group="telemetry", exit_on_error=False)
    def _sample(self) -> None:
        self.post_message(TelemetrySampled(self.sources.sampler.sample()))
        if self.sources.separate_guard:  # --simulate: the real machine plans real jobs
            self.post_message(MachineSampled(self.sources.guard.sample()))

    @on(MachineSampled)
    def _on_machine_sample(self, message: MachineSampled) -> None:
        self.machine_snapshot = message.snapshot

    @on(TelemetrySampled)
    def _on_sample(self, message: TelemetrySampled) -> None:
        self.history.append(message.snapshot)
        self.snapshot = message.snapshot

    @work(thread=True, group="calibration", exit_on_error=False)
    def _calibrate(self) -> None:
        """On this machine's first use, its calibration for the time estimates (a few seconds, in a child
        process); the plan's estimates are made again with it."""
        from qexplorer.core.domain.bench import BenchConfig
        from qexplorer.core.session import calibrate_machine

        said: list[str] = []
        calibrate_machine(self.settings.results_path, BenchConfig().thread_count, said.append)
        if said:
            self.call_from_thread(self._calibrated, said[-1])

    def _calibrated(self, text: str) -> None:
        self._estimated = None
        self.notify(f"Time estimates: {text}.", timeout=6)

    # ------------------------------------------------------------------ catalog
    @work(thread=True, group="catalog", exit_on_error=False)
    def _scan_catalog(self) -> None:
        self.post_message(CatalogScanned(tuple(self.sources.catalog.scan())))

    @on(CatalogScanned)
    def _on_catalog(self, message: CatalogScanned) -> None:
        self.catalog_scanning = False
        self.catalog_entries = message.entries
        if self.model is None:
            wanted = next((e for e in message.entries if e.ref == self.model_ref and e.spec), None)
            if wanted is None and self.model_ref != DEFAULT_ALIAS:
                self.notify(f"Model {self.model_ref!r} was not found or cannot be read; pick one with m.",
                            severity="warning", timeout=8)
            self.model = wanted.spec if wanted else None

    def watch_model(self, model: ModelSpec | None) -> None:
        if not self.dashboard_only:
            self.sub_title = model.name if model else "no model chosen (m)"

    @on(Worker.StateChanged)
    def _on_worker_state(self, event: Worker.StateChanged) -> None:
        if event.state != WorkerState.ERROR:
            return
        if event.worker.group == "telemetry":
            self.notify(f"Telemetry failed: {event.worker.error}", severity="error", timeout=6)
        elif event.worker.group == "catalog":
            self.catalog_scanning = False
            self.notify(f"Model search failed: {event.worker.error}", severity="error", timeout=8)

    # ------------------------------------------------------------------ actions
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if self.dashboard_only and action in ("models", "plan", "run_screen", "compare"):
            return False  # `qexplorer monitor` is the dashboard alone
        return True

    def action_help(self) -> None:
        # Imported here: the Markdown widget costs ~25 ms of start-up otherwise.
        from qexplorer.ui.screens.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_dashboard(self) -> None:
        while len(self.screen_stack) > 2:
            self.pop_screen()

    def _show(self, screen_type: type) -> None:
        """Bring a screen to the top: reuse it if it is already in the stack."""
        if self.dashboard_only:
            return
        for index, screen in enumerate(self.screen_stack):
            if isinstance(screen, screen_type):
                while len(self.screen_stack) > index + 1:
                    self.pop_screen()
                return
        self.push_screen(screen_type())

    def action_models(self) -> None:
        from qexplorer.ui.screens.models import ModelPickerScreen

        self._show(ModelPickerScreen)

    def action_plan(self) -> None:
        from qexplorer.ui.screens.plan import PlanScreen

        self._show(PlanScreen)

    def action_compare(self) -> None:
        from qexplorer.ui.screens.compare import CompareScreen

        self._show(CompareScreen)

    # ------------------------------------------------------------------ results
    def load_results(self) -> None:
        """Read the store in a thread; a damaged or locked store is one message, not a crash."""
        self._load_results()

    @work(thread=True, group="results", exclusive=True, exit_on_error=False)
    def _load_results(self) -> None:
        from qexplorer.core.compare import rows_from_results
        from qexplorer.core.results import ResultsStore

        model_path = self.model.path if self.model else None
        try:
            store = ResultsStore.in_dir(self.settings.results_path)
            compared = store.comparable(model_path)
            rows = rows_from_results(compared, store.latest_servers())
            error = None
        except UserError as exc:
            rows, error = None, str(exc)
        self.post_message(ResultsLoaded(rows, error))

    @on(ResultsLoaded)
    def _on_results(self, message: ResultsLoaded) -> None:
        self.results_error = message.error
        if message.error:
            self.notify(message.error, severity="error", timeout=10)
        if message.rows is not None:
            self.compare_rows = message.rows  # on error the rows already shown stay
        else:
            self.mutate_reactive(QExplorerApp.compare_rows)  # screens re-read results_error

    def export_results(self) -> None:
        self._export_results()

    @work(thread=True, group="results", exit_on_error=False)
    def _export_results(self) -> None:
        from qexplorer.core.results import ResultsStore, write_exports

        try:
            store = ResultsStore.in_dir(self.settings.results_path)
            rows = store.comparable(self.model.path if self.model else None).all
            paths = write_exports(rows, self.settings.results_path / "exports")
            self.call_from_thread(self.notify, "Wrote " + ", ".join(str(p) for p in paths), timeout=10)
        except (UserError, OSError) as exc:
            self.call_from_thread(self.notify, f"Export failed: {exc}", severity="error", timeout=10)

    # ------------------------------------------------------------------ jobs
    @property
    def job_queue(self):
        """The session's headless job queue (core); created, with its one consumer thread, on first use."""
        if self._job_queue is None:
            from qexplorer.core.jobs.queue import JobQueue
            from qexplorer.core.jobs.runner import JobRunner
            from qexplorer.core.results import ResultsStore
            from qexplorer.core.server import run_server_spec
            from qexplorer.core.settings import engine_env

            self._job_queue = JobQueue(
                JobRunner(sampler=self.sources.guard, display=self.sources.sampler, interval_s=self.refresh_s,
                          extra_env=engine_env(self.settings)),
                ResultsStore.in_dir(self.settings.results_path),
                on_change=lambda view: self.post_message(JobChanged(view)),
                server_runner=run_server_spec,
                start_consumer=self._consume_jobs,
                overlap=True,  # the next job prepares beside the running one; timed phases run alone
            )
        return self._job_queue

    @work(thread=True, group="jobs", exit_on_error=False)
    def _consume_jobs(self) -> None:
        """The one consumer: the queue starts it when a job arrives and none runs; it ends when the queue is empty."""
        self.job_queue.drain()

    @on(JobChanged)
    def _on_job_changed(self, message: JobChanged) -> None:
        view = message.view
        jobs = list(self.jobs)
        index = next((i for i, j in enumerate(jobs) if j.id == view.id), None)
        if index is None:
            jobs.append(view)
        elif jobs[index].revision < view.revision:
            before = jobs[index]
            jobs[index] = view
            if view.finished and not before.finished:
                self._announce(view)
        else:
            return  # an older view arrived late
        self.jobs = tuple(jobs)
        self.quiet = any(j.measuring_now for j in jobs)

    def _announce(self, view) -> None:
        if view.status == JobStatus.OK:
            if view.export is not None:
                self.notify(view.message, timeout=15)
            else:
                self.notify(f"{view.label}: done.", timeout=4)
                self.load_results()
        elif view.status != JobStatus.CANCELLED:
            self.notify(f"{view.label}: {view.error}", severity="error", timeout=10)
        if view.store_error:
            self.notify(view.store_error, severity="error", timeout=10)

    def export_model(self, precision_key: str) -> None:
        """Export the selected precision as a servable artifact, in a worker process."""
        from qexplorer.core.domain.spec import JobSpec
        from qexplorer.core.kinds import JobAction
        from qexplorer.core.precisions import get as get_precision

        if self.model is None:
            return
        out = self.settings.results_path / "exports" / _export_name(self.model.name, precision_key)
        out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        spec = JobSpec(model_ref=self.model.path, precision=precision_key, data_dir=str(self.settings.results_path),
                       model_paths=tuple(self.settings.models), model_name=self.model.name,
                       model_path=self.model.path, action=JobAction.EXPORT, export_path=str(out))
        self.job_queue.submit([spec])
        self.notify(f"Exporting {get_precision(precision_key).label} to {out} (see jobs, j).", timeout=6)

    def add_server_target(self, url: str) -> None:
        """Benchmark a running OpenAI-compatible server; it shows up as a job and then beside local results."""
        from qexplorer.core.domain.spec import ServerSpec

        self.job_queue.submit([ServerSpec(url.strip())])

    def action_run_screen(self) -> None:
        from qexplorer.ui.screens.jobs import JobsScreen

        self._show(JobsScreen)

    def bench_config(self):
        from dataclasses import replace

        from qexplorer.core.domain.bench import BenchConfig

        bench = BenchConfig.quick() if self.quick_bench else BenchConfig()
        extras = self.run_extras.bench
        return replace(bench, depths=self.bench_depths, threads=extras.threads,
                       repetitions=extras.repetitions if extras.repetitions != BenchConfig.repetitions
                       else bench.repetitions)

    def run_options(self) -> RunOptions:
        """The dialog's options with the plan screen's toggles (quick, depth, quality, re-measure, tasks) applied."""
        from dataclasses import replace

        from qexplorer.core.tasks.run import DEFAULT_TASKS

        return replace(self.run_extras, bench=self.bench_config(), quality=self.measure_quality,
                       reuse=not self.remeasure, shown_profile=self.sources.sampler.simulated,
                       tasks=DEFAULT_TASKS if self.measure_tasks else (), load=self.load_sweep() if self.measure_load
                       else None)

    def load_sweep(self):
        """The plan screen's load sweep: the default levels under the objective the settings give."""
        from qexplorer.core.domain.load import LoadPlan, LoadSweepSpec, ServiceObjective

        objective = ServiceObjective(ttft_p99_s=self.settings.slo_ttft_p99_s, itl_p99_ms=self.settings.slo_itl_p99_ms)
        return LoadSweepSpec(plan=LoadPlan(objective=objective))

    def planned_jobs(self):
        """The chosen precisions as a core run plan (core.session: the CLI's too), each job with its estimate."""
        from qexplorer.core.planner import hardware_from_snapshot
        from qexplorer.core.precisions import PRECISIONS
        from qexplorer.core.session import plan_run

        options = self.run_options()
        # real jobs are planned against the real machine, whatever profile the screens show
        real = self.machine_snapshot if self.sources.separate_guard else self.snapshot
        cuda = hardware_from_snapshot(real).cuda
        chosen = [p for p in PRECISIONS if p.key in self.chosen]
        # the plan screen asks every second; the estimate changes only with the jobs, the options, or a job's end
        measured = frozenset(r.precision for r in self.compare_rows)  # those already answered get no quick pass
        key = (self.model.path, tuple(p.key for p in chosen), options, cuda, sum(j.finished for j in self.jobs),
               measured)
        cached = self._estimated[1] if self._estimated is not None and self._estimated[0] == key else None
        plan = plan_run(self.model.path, self.model, chosen, options, real, self.settings.results_path,
                        self.settings.models, cuda=cuda, estimates=cached, measured=measured)
        self._estimated = (key, plan.estimates)
        return plan

    def shown_estimates(self, planned):
        """The estimates the plan screen shows: the real jobs' own, or under --simulate the same jobs as the
        shown device would run them (projected from its published figures where it has them)."""
        if not self.sources.separate_guard or self.snapshot is None or not planned.specs:
            return planned.estimates
        from qexplorer.core.eta import estimate_jobs

        key = (self._estimated[0] if self._estimated else None, self.snapshot.simulated)
        if self._shown_estimated is None or self._shown_estimated[0] != key:
            device = self.snapshot.devices[0].name if self.snapshot.devices else None
            self._shown_estimated = (key, estimate_jobs(self.model, planned.specs, self.settings.results_path,
                                                        cuda=bool(self.snapshot.devices), device=device,
                                                        simulated=True))
        return self._shown_estimated[1]

    def queue_chosen(self) -> None:
        """Queue one job per chosen precision that the plan says fits; then show the jobs screen."""
        from qexplorer.core.safety import check_loadable

        if self.model is None:
            self.notify("Pick a model first (m).", severity="warning")
            return
        try:
            check_loadable(self.model)
            # HumanEval without network isolation is refused here, in one sentence, as the CLI does - not in
            # every worker after its benchmark
            from qexplorer.core.tasks.run import check_can_score

            options = self.run_options()
            check_can_score(options.tasks, options.allow_unisolated_exec)
        except UserError as exc:
            self.notify(str(exc), severity="error", timeout=10)
            return
        planned = self.planned_jobs()
        if planned.refused:
            self.notify("Not queued, does not fit: " + "; ".join(
                f"{r.label} ({format_bytes(r.need_bytes)} > {format_bytes(r.headroom_bytes)} headroom)"
                for r in planned.refused), severity="warning", timeout=10)
        if not planned.specs and not planned.refused:
            self.notify("Select precisions with space first.", severity="warning")
        self.action_run_screen()
        if planned.specs:
            self.job_queue.overlap = planned.overlap
            self.job_queue.submit(planned.specs, estimates=planned.estimates)

    def cancel_job(self, job_id: int) -> None:
        if self._job_queue is not None:
            self._job_queue.cancel(job_id)


def _export_name(model_name: str, precision_key: str) -> str:
    from qexplorer.core.precisions import get as get_precision

    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in model_name)[:60]
    return f"{safe}-{precision_key}.gguf" if get_precision(precision_key).is_gguf else f"{safe}-{precision_key}"


def make_app(settings: Settings, sources: Sources, *, dashboard_only: bool = False,
             live: bool = True, model_ref: str = DEFAULT_ALIAS) -> QExplorerApp:
    """Build the app. ``live=False`` leaves sampling to the caller (tests inject
    snapshots through :class:`TelemetrySampled`, the production message)."""
    return QExplorerApp(settings, sources, dashboard_only=dashboard_only, live=live, model_ref=model_ref)
