"""The jobs screen: the job queue, each job's phase and progress, and its memory as it climbs."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, ProgressBar, Static
from textual_plotext import PlotextPlot

from qexplorer.core.eta import format_duration
from qexplorer.core.jobs.queue import JobView
from qexplorer.core.kinds import JobStatus
from qexplorer.core.units import GIB, format_bytes
from qexplorer.ui.screens.live import watch_while_shown
from qexplorer.ui.widgets.plots import theme_rgb

STATUS_STYLE = {"ok": "text-success", "failed": "text-error", "stopped": "text-error", "timeout": "text-error",
                "cancelled": "text-warning", "running": "text-accent", "queued": "text-muted"}


class JobsScreen(Screen):
    """Jobs started from the plan screen (`r`), newest last."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("k", "cancel", "Cancel job"),
        Binding("K", "cancel_all", "Cancel all", show=False),
        Binding("a", "add_server", "Add server"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        table: DataTable = DataTable(id="job-table", cursor_type="row", zebra_stripes=True)
        self._left_column = table.add_columns("precision", "status", "phase", "left", "peak RSS", "peak GPU", "decode",
                                              "KLD", "top-1")[3]
        yield table
        yield Static("", id="queue-eta")
        yield ProgressBar(id="job-progress", show_eta=False)
        yield Static("", id="job-message")
        yield PlotextPlot(id="job-memory")
        yield Footer()

    def on_mount(self) -> None:
        watch_while_shown(self, ("jobs", "quiet"), self._refresh)
        watch_while_shown(self, ("snapshot",), self._refresh_eta)  # the clock moves on
        self._refresh(plot=True)
        self.query_one("#job-table", DataTable).focus()

    def _selected(self) -> JobView | None:
        jobs = self.app.jobs
        row = self.query_one("#job-table", DataTable).cursor_row
        if 0 <= row < len(jobs):
            return jobs[row]
        return next((j for j in jobs if j.status == "running"), jobs[-1] if jobs else None)

    def _refresh(self, plot: bool = False) -> None:
        """The table and the selected job; its memory plot too unless a job is timed now (``quiet``): then only
        when the screen is shown (``plot``), so that it never redraws beside a measurement."""
        table = self.query_one("#job-table", DataTable)
        row = table.cursor_row
        table.clear()
        colours = self.app.theme_variables
        for job in self.app.jobs:
            decode = kld = top1 = ""
            record = job.record
            if record is not None and record.speed is not None:
                tg = record.speed.decode_tok_s
                decode = f"{tg.mean:.1f} ± {tg.sd:.1f} tok/s"
            if record is not None and record.quality is not None:
                kld = f"{record.quality.kld_mean:.4f}"
                top1 = f"{record.quality.same_top1_pct:.1f} %"
            status = Text(job.status, style=colours.get(STATUS_STYLE.get(job.status, ""), ""))
            gpu = format_bytes(job.peak_gpu_bytes) if job.peak_gpu_bytes is not None else "-"
            table.add_row(job.label, status, job.phase or "-", self._left(job), format_bytes(job.peak_rss_bytes or None),
                          gpu, decode, kld, top1, key=str(job.id))
        self._queue_line()
        if table.row_count:
            running = next((i for i, j in enumerate(self.app.jobs) if j.status == JobStatus.RUNNING), None)
            table.move_cursor(row=min(row if row > 0 or running is None else running, table.row_count - 1))
        self._show_job(self._selected(), plot=plot or not self.app.quiet)

    def on_screen_resume(self) -> None:
        self._refresh(plot=True)

    def on_data_table_row_highlighted(self, _event: DataTable.RowHighlighted) -> None:
        self._show_job(self._selected())

    def _left(self, job: JobView) -> str:
        left = job.left_s(self.app.clock())
        if left is None or job.finished:
            return "-" if left is None else ""
        return f"~{format_duration(left)}"

    def _refresh_eta(self) -> None:
        table = self.query_one("#job-table", DataTable)
        for job in self.app.jobs:
            if not job.finished and str(job.id) in table.rows:
                table.update_cell(str(job.id), self._left_column, self._left(job))
        self._queue_line()

    def _queue_line(self) -> None:
        """The queue's time left (estimated), and each finished job's predicted against its actual duration."""
        unfinished = [j for j in self.app.jobs if not j.finished]
        now = self.app.clock()
        lefts = [j.left_s(now) for j in unfinished]
        line = ""
        if unfinished and all(x is not None for x in lefts):
            sources = {j.estimate.source for j in unfinished if j.estimate is not None}
            line = (f"queue: {len(unfinished)} jobs, at most ~{format_duration(sum(lefts))} left (estimated "
                    f"{sources.pop() if len(sources) == 1 else 'partly from defaults'}; overlapping shortens it)")
        elif unfinished:
            line = f"queue: {len(unfinished)} jobs (no estimate for some)"
        self.query_one("#queue-eta", Static).update(line)

    def _show_job(self, job: JobView | None, plot: bool = True) -> None:
        bar = self.query_one("#job-progress", ProgressBar)
        message = self.query_one("#job-message", Static)
        if job is None:
            message.update("No jobs yet: on the plan screen (p), select precisions with space and press r.")
            bar.update(total=1, progress=0)  # not the pulsing indeterminate bar: nothing is running
            self._plot(None)
            return
        if job.finished:
            bar.update(total=1, progress=1)
        elif job.total:
            bar.update(total=job.total, progress=job.done)
        else:
            bar.update(total=None)
        text = job.error or job.message
        warnings = f"  ⚠ {job.warnings[-1]}" if job.warnings else ""
        log = f"  (log: {Path(job.log_path).name})" if job.log_path else ""
        plan = ""
        if job.record is not None:
            check = job.record.memory.plan_check(job.record.hardware.gpu_unified if job.record.hardware else None)
            if check.error_pct is not None:
                plan = (f"\npeak {check.term} {format_bytes(check.measured_bytes)} measured vs "
                        f"{format_bytes(check.planned_bytes)} planned ({check.error_pct:+.0f} %)")
        if job.finished and job.estimate is not None and job.took_s is not None:
            plan += f"\ntook {format_duration(job.took_s)}, estimated {format_duration(job.estimate.total_s)}"
        message.update(f"[b]{job.label}[/b] · {job.phase or job.status}: {text}{warnings}{log}{plan}")
        if plot:
            self._plot(job)

    def _plot(self, job: JobView | None) -> None:
        widget = self.query_one("#job-memory", PlotextPlot)
        widget.border_title = "job memory (GiB, measured from outside)" + (
            " · held while a figure is timed" if self.app.quiet else "")
        plt = widget.plt
        plt.clear_data()
        plt.clear_figure()
        plt.xlabel("seconds since start")
        if job is not None and job.memory:
            xs = [s.elapsed_s for s in job.memory]
            plt.plot(xs, [s.rss_bytes / GIB for s in job.memory], label="job RSS",
                     color=theme_rgb(self.app, "accent"), marker="braille")
            gpu = [(s.elapsed_s, s.gpu_bytes / GIB) for s in job.memory if s.gpu_bytes is not None]
            if any(g[1] for g in gpu):
                plt.plot([g[0] for g in gpu], [g[1] for g in gpu], label="job GPU (NVML)",
                         color=theme_rgb(self.app, "warning"), marker="braille")
            if job.planned_peak_bytes:
                plt.plot([xs[0], xs[-1]], [job.planned_peak_bytes / GIB] * 2, label="predicted peak",
                         color=theme_rgb(self.app, "error"), marker="braille")
            # headroom is tens of GiB where a job is a few: it gets the right-hand axis
            headroom = [(s.elapsed_s, s.headroom_bytes / GIB) for s in job.memory if s.headroom_bytes is not None]
            if headroom:
                plt.plot([h[0] for h in headroom], [h[1] for h in headroom], label="headroom (right axis)",
                         color=theme_rgb(self.app, "success"), marker="braille", yside="right")
            plt.ylim(0, None)
        widget.refresh()

    def action_add_server(self) -> None:
        from qexplorer.ui.screens.server import ServerTargetScreen

        def add(url: str | None) -> None:
            if url:
                self.app.add_server_target(url)

        self.app.push_screen(ServerTargetScreen(), add)

    def action_cancel(self) -> None:
        job = self._selected()
        if job is not None and not job.finished:
            self.app.cancel_job(job.id)

    def action_cancel_all(self) -> None:
        for job in self.app.jobs:
            if not job.finished:
                self.app.cancel_job(job.id)
