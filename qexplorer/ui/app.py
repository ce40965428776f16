"""The Textual app and its factory, used by the CLI and the tests alike."""

from __future__ import annotations

import os
import threading
from collections import deque
from pathlib import Path

from textual import on, work
from textual.app import App
from textual.binding import Binding
from textual.reactive import reactive
from textual.timer import Timer
from textual.worker import Worker, WorkerState

from qexplorer.core.catalog import DEFAULT_ALIAS, CatalogEntry, ModelSpec
from qexplorer.core.errors import UserError
from qexplorer.core.settings import Settings
from qexplorer.core.telemetry import TelemetrySnapshot
from qexplorer.core.units import format_bytes
from qexplorer.ui.jobstate import JobState
from qexplorer.ui.messages import (
    CatalogScanned,
    JobEventMessage,
    JobFinished,
    JobMemoryMessage,
    ResultsLoaded,
    TelemetrySampled,
)
from qexplorer.ui.screens.dashboard import DashboardScreen
from qexplorer.ui.sources import Sources
from qexplorer.ui.themes import DEFAULT_THEME, load_themes

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
    measure_quality: reactive[bool] = reactive(True)
    jobs_version: reactive[int] = reactive(0)
    results_version: reactive[int] = reactive(0)

    def __init__(self, settings: Settings, sources: Sources, *, dashboard_only: bool = False,
                 live: bool = True, model_ref: str = DEFAULT_ALIAS) -> None:
        super().__init__()
        self.model_ref = model_ref
        self.settings = settings
        self.sources = sources
        self.dashboard_only = dashboard_only
        self.live = live
        self.history: deque[TelemetrySnapshot] = deque(maxlen=HISTORY_SAMPLES)
        self._timer: Timer | None = None
        self.jobs: list[JobState] = []
        self._job_cancels: dict[int, threading.Event] = {}
        self._queue_running = False
        self.compare_rows: list = []
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

    def on_unmount(self) -> None:
        self.sources.sampler.close()

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

    @on(TelemetrySampled)
    def _on_sample(self, message: TelemetrySampled) -> None:
        self.history.append(message.snapshot)
        self.snapshot = message.snapshot

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
        from qexplorer.ui.screens.precisions import PrecisionPickerScreen

        self._show(PrecisionPickerScreen)

    def action_compare(self) -> None:
        from qexplorer.ui.screens.compare import CompareScreen

        self._show(CompareScreen)

    # ------------------------------------------------------------------ results
    def load_results(self) -> None:
        """Read the store in a thread; a damaged or locked store is one message, not a crash."""
        self._load_results()

    @work(thread=True, group="results", exclusive=True, exit_on_error=False)
    def _load_results(self) -> None:
        from qexplorer.core.compare import row_from_result
        from qexplorer.core.results import ResultsStore

        model_path = self.model.path if self.model else None
        try:
            store = ResultsStore.in_dir(self.settings.results_path)
            results = store.latest_per_precision(model_path) + store.latest_servers()
            rows, error = [row_from_result(r) for r in results], None
        except UserError as exc:
            rows, error = None, str(exc)
        self.post_message(ResultsLoaded(rows, error))

    @on(ResultsLoaded)
    def _on_results(self, message: ResultsLoaded) -> None:
        if message.rows is not None:
            self.compare_rows = message.rows  # on error the rows already shown stay
        self.results_error = message.error
        if message.error:
            self.notify(message.error, severity="error", timeout=10)
        self.results_version += 1

    def export_results(self) -> None:
        self._export_results()

    @work(thread=True, group="results", exit_on_error=False)
    def _export_results(self) -> None:
        from qexplorer.core.results import ResultsStore, write_exports

        try:
            store = ResultsStore.in_dir(self.settings.results_path)
            rows = store.latest_per_precision(self.model.path if self.model else None)
            paths = write_exports(rows, self.settings.results_path / "exports")
            self.call_from_thread(self.notify, "Wrote " + ", ".join(str(p) for p in paths), timeout=10)
        except (UserError, OSError) as exc:
            self.call_from_thread(self.notify, f"Export failed: {exc}", severity="error", timeout=10)

    def export_model(self, precision_key: str) -> None:
        """Export the selected precision as a servable artifact, in a worker process."""
        from qexplorer.core.pipeline import JobSpec
        from qexplorer.core.precisions import get as get_precision

        if self.model is None:
            return
        out = self.settings.results_path / "exports" / _export_name(self.model.name, precision_key)
        out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        spec = JobSpec(model_ref=self.model.path, precision=precision_key, data_dir=str(self.settings.results_path),
                       model_paths=tuple(self.settings.models), model_name=self.model.name,
                       model_path=self.model.path, action="export", export_path=str(out))
        job = JobState(id=len(self.jobs) + 1, spec=spec, label=f"export {get_precision(precision_key).label}")
        self.jobs.append(job)
        self.jobs_version += 1
        self.notify(f"Exporting {get_precision(precision_key).label} to {out} (see jobs, j).", timeout=6)
        if not self._queue_running:
            self._queue_running = True
            self._run_queue()

    def add_server_target(self, url: str) -> None:
        """Benchmark a running OpenAI-compatible server; it shows up as a job and then beside local results."""
        from qexplorer.core.bench.server import ServerTarget

        target = ServerTarget(url.strip())
        job = JobState(id=len(self.jobs) + 1, spec=None, label=f"server {target.host}")
        self.jobs.append(job)
        self.jobs_version += 1
        self._server_sweep(job.id, target)

    @work(thread=True, group="server", exit_on_error=False)
    def _server_sweep(self, job_id: int, target) -> None:
        from qexplorer.core.bench import server
        from qexplorer.core.jobs import JobOutcome
        from qexplorer.core.results import ResultsStore

        result: dict = {"levels": []}
        error = None
        try:
            for item in server.sweep(target):
                if isinstance(item, dict):
                    result = item
                else:
                    self.post_message(JobEventMessage(job_id, item))
            error = result.get("error")
            if result["levels"]:
                record = server.record_from_sweep(result)
                ResultsStore.in_dir(self.settings.results_path).add(record)
        except UserError as exc:
            error = str(exc)
            record = None
        else:
            record = server.record_from_sweep(result) if result["levels"] else None
        outcome = JobOutcome(job=None, status="ok" if error is None else "failed", record=record, error=error)
        self.post_message(JobFinished(job_id, outcome))

    def action_run_screen(self) -> None:
        from qexplorer.ui.screens.run import RunScreen

        self._show(RunScreen)

    # ------------------------------------------------------------------ jobs
    def bench_config(self):
        from qexplorer.core.bench import BenchConfig

        return BenchConfig.quick() if self.quick_bench else BenchConfig()

    def queue_chosen(self) -> None:
        """Queue one job per chosen precision that the plan says fits; then show the run screen."""
        from qexplorer.core.pipeline import JobSpec
        from qexplorer.core.planner import PlanRequest, plan_job_peak, plan_precision
        from qexplorer.core.precisions import PRECISIONS
        from qexplorer.core.safety import check_loadable

        if self.model is None:
            self.notify("Pick a model first (m).", severity="warning")
            return
        try:
            check_loadable(self.model)
        except UserError as exc:
            self.notify(str(exc), severity="error", timeout=10)
            return
        bench = self.bench_config()
        request = PlanRequest(context=bench.prompt_tokens + bench.gen_tokens)
        queued, refused = [], []
        for precision in (p for p in PRECISIONS if p.key in self.chosen):  # registry order
            key = precision.key
            plan = plan_precision(self.model, precision, request, self.snapshot)
            if plan.verdict == "does not fit":
                refused.append(f"{precision.label} ({format_bytes(plan.total_bytes)} > "
                               f"{format_bytes(plan.headroom_bytes)} headroom)")
                continue
            spec = JobSpec(
                model_ref=self.model.path, precision=key, data_dir=str(self.settings.results_path), bench=bench,
                model_paths=tuple(self.settings.models), model_name=self.model.name, model_path=self.model.path,
                planned_peak_bytes=plan_job_peak(self.model, precision, bench, on_gpu=plan.runs_on == "GPU"),
                planned_total_bytes=plan.total_bytes, quality=self.measure_quality,
            )
            job = JobState(id=len(self.jobs) + 1, spec=spec, label=precision.label)
            self.jobs.append(job)
            queued.append(job)
        if refused:
            self.notify("Not queued, does not fit: " + "; ".join(refused), severity="warning", timeout=10)
        if not queued and not refused:
            self.notify("Select precisions with space first.", severity="warning")
        self.jobs_version += 1
        self.action_run_screen()
        if queued and not self._queue_running:
            self._queue_running = True
            self._run_queue()

    def cancel_job(self, job_id: int) -> None:
        job = next((j for j in self.jobs if j.id == job_id), None)
        if job is None or job.finished:
            return
        if job.status == "queued":
            job.status = "cancelled"
            job.message = "Cancelled before it started."
        else:
            self._job_cancels.setdefault(job_id, threading.Event()).set()
        self.jobs_version += 1

    @work(thread=True, group="jobs", exit_on_error=False)
    def _run_queue(self) -> None:
        from qexplorer.core.jobs import JobRunner, store_outcome
        from qexplorer.core.results import ResultsStore

        runner = JobRunner(sampler=self.sources.sampler, interval_s=self.refresh_s)
        store = ResultsStore.in_dir(self.settings.results_path)
        try:
            while True:
                job = next((j for j in self.jobs if j.status == "queued"), None)
                if job is None:
                    return
                job.status = "running"
                cancel = self._job_cancels.setdefault(job.id, threading.Event())
                outcome = runner.run(
                    job.spec,
                    on_event=lambda event, jid=job.id: self.post_message(JobEventMessage(jid, event)),
                    on_memory=lambda sample, jid=job.id: self.post_message(JobMemoryMessage(jid, sample)),
                    cancel=cancel,
                )
                store_error = None
                if job.spec.action == "run":
                    try:
                        store_outcome(store, outcome)
                    except UserError as exc:
                        store_error = str(exc)
                self.post_message(JobFinished(job.id, outcome, store_error))
        finally:
            self._queue_running = False
        self.compare_rows: list = []
        self.results_error: str | None = None

    def _job(self, job_id: int) -> JobState | None:
        return next((j for j in self.jobs if j.id == job_id), None)

    @on(JobEventMessage)
    def _on_job_event(self, message: JobEventMessage) -> None:
        job = self._job(message.job_id)
        if job is not None:
            job.apply(message.event)
            self.jobs_version += 1

    @on(JobMemoryMessage)
    def _on_job_memory(self, message: JobMemoryMessage) -> None:
        job = self._job(message.job_id)
        if job is not None:
            job.memory.append(message.sample)
            self.jobs_version += 1

    @on(JobFinished)
    def _on_job_finished(self, message: JobFinished) -> None:
        job = self._job(message.job_id)
        if job is None:
            return
        job.outcome = message.outcome
        job.status = message.outcome.status
        if job.spec is None:  # a server sweep
            job.phase = "done" if message.outcome.ok else job.phase
            job.message = message.outcome.error or "stored; it appears on the compare screen (c)"
            if message.outcome.error:
                self.notify(f"{job.label}: {message.outcome.error}", severity="error", timeout=10)
            self.load_results()
        elif message.outcome.ok and job.spec.action == "export" and message.outcome.record:
            job.phase = "done"
            job.message = f"serve it with: {message.outcome.record['serve_command']}"
            self.notify(job.message, timeout=15)
        elif message.outcome.ok:
            job.phase = "done"
            job.message = f"stored in {self.settings.results_path / 'results.sqlite3'}"
            self.notify(f"{job.label}: done.", timeout=4)
            self.load_results()
        if not message.outcome.ok and job.spec is not None:
            self.notify(f"{job.label}: {message.outcome.error}", severity="error", timeout=10)
        if message.store_error:
            self.notify(message.store_error, severity="error", timeout=10)
        self.jobs_version += 1


def _export_name(model_name: str, precision_key: str) -> str:
    from qexplorer.core.precisions import get as get_precision

    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in model_name)[:60]
    return f"{safe}-{precision_key}.gguf" if get_precision(precision_key).is_gguf else f"{safe}-{precision_key}"


def make_app(settings: Settings, sources: Sources, *, dashboard_only: bool = False,
             live: bool = True, model_ref: str = DEFAULT_ALIAS) -> QExplorerApp:
    """Build the app. ``live=False`` leaves sampling to the caller (tests inject
    snapshots through :class:`TelemetrySampled`, the production message)."""
    return QExplorerApp(settings, sources, dashboard_only=dashboard_only, live=live, model_ref=model_ref)
