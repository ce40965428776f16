"""The live memory dashboard: the truth about GPU and host memory, every second."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static
from textual_plotext import PlotextPlot

from qexplorer.core.breakdown import breakdowns
from qexplorer.core.kinds import NvmlState
from qexplorer.core.telemetry import Reading, TelemetrySnapshot
from qexplorer.core.units import GIB, format_bytes, format_gib
from qexplorer.ui.screens.live import watch_while_shown
from qexplorer.ui.widgets.memory_bar import MemoryBar
from qexplorer.ui.widgets.plots import theme_rgb

REFRESH_STEPS_S = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0)


def _fmt_bytes(reading: Reading) -> str:
    return format_gib(reading.value) if reading.available else "n/a"


def _fmt_reading(reading: Reading, unit: str, fmt: str = "{:.0f}") -> str:
    if reading.value is None:
        return "n/a"
    return f"{fmt.format(reading.value)} {unit}"


class DashboardScreen(Screen):
    """Memory bars, a per-GPU table, the memory history on an absolute scale, and the process table."""

    BINDINGS = [
        Binding("plus,equals_sign", "faster", "Rate ±", key_display="+/-"),
        Binding("minus", "slower", "Slower", show=False),
        Binding("space", "toggle_pause", "Pause"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("waiting for the first sample…", id="banner")
        yield Vertical(id="bars")
        gpus: DataTable = DataTable(id="gpus", cursor_type="none", show_cursor=False)
        gpus.add_columns("GPU", "name", "memory used", "util", "power", "temp", "SM clock", "CC")
        yield gpus
        yield Static("", id="gpu-stats")
        yield PlotextPlot(id="history")
        table: DataTable = DataTable(id="processes", cursor_type="row", zebra_stripes=True)
        table.add_columns("PID", "process", "GPU", "RSS", "")
        yield table
        yield Footer()

    def on_mount(self) -> None:
        watch_while_shown(self, ("snapshot", "refresh_s", "paused", "quiet"),
                          lambda: self._show_snapshot(self.app.snapshot))
        self._show_snapshot(self.app.snapshot, full=True)

    def on_screen_resume(self) -> None:
        self._show_snapshot(self.app.snapshot, full=True)

    # ------------------------------------------------------------------ actions
    def action_faster(self) -> None:
        current = self.app.refresh_s
        faster = [s for s in REFRESH_STEPS_S if s < current]
        self.app.refresh_s = faster[-1] if faster else REFRESH_STEPS_S[0]

    def action_slower(self) -> None:
        current = self.app.refresh_s
        slower = [s for s in REFRESH_STEPS_S if s > current]
        self.app.refresh_s = slower[0] if slower else REFRESH_STEPS_S[-1]

    def action_toggle_pause(self) -> None:
        self.app.paused = not self.app.paused

    # ------------------------------------------------------------------ drawing
    def _show_snapshot(self, snapshot: TelemetrySnapshot | None, full: bool = False) -> None:
        """Everything from one sample; while a job is timed (``quiet``) the plot and the process table only when
        the screen is shown (``full``), not on every sample."""
        if snapshot is None:
            return
        with self.app.batch_update():
            self._show_banner(snapshot)
            self._show_bars(snapshot)
            self._show_gpu_stats(snapshot)
            if full or not self.app.quiet:
                self._show_history()
                self._show_processes(snapshot)

    def _show_banner(self, snapshot: TelemetrySnapshot) -> None:
        parts = []
        if snapshot.simulated:
            parts.append(f"[reverse] SIMULATED {snapshot.simulated} [/reverse]")
        if snapshot.devices:
            device = snapshot.devices[0]
            kind = {True: "unified memory", False: "discrete", None: "memory unknown"}[device.unified]
            parts.append(f"{device.name.removeprefix('NVIDIA ')} · {kind}")
        elif snapshot.nvml_state == NvmlState.LOST:
            parts.append("[reverse b] TELEMETRY LOST [/reverse b] GPU figures unavailable")
        else:
            parts.append("no GPU")
        stamp = time.strftime("%H:%M:%S", time.gmtime(snapshot.timestamp_s))
        state = "[b]paused[/b]" if self.app.paused else f"every {self.app.refresh_s:g} s"
        parts.append(f"{stamp} UTC · {state}")
        self.query_one("#banner", Static).update("  ".join(parts))

    def _show_bars(self, snapshot: TelemetrySnapshot) -> None:
        container = self.query_one("#bars", Vertical)
        wanted = breakdowns(snapshot)
        bars = list(container.query(MemoryBar))
        if len(bars) != len(wanted):
            container.remove_children()
            container.mount_all(MemoryBar(b) for b in wanted)
            return
        for bar, breakdown in zip(bars, wanted, strict=True):
            bar.breakdown = breakdown

    def _show_gpu_stats(self, snapshot: TelemetrySnapshot) -> None:
        stats = self.query_one("#gpu-stats", Static)
        host = snapshot.host
        cache = format_gib(host.reclaimable_cache_bytes.value) if host.reclaimable_cache_bytes.available else "n/a"
        psi = _fmt_reading(host.psi_some_avg10_pct, "%", "{:.1f}")
        pinned = ""
        if host.shmem_bytes.available or host.mlocked_bytes.available:
            pinned = (f" · shmem {_fmt_bytes(host.shmem_bytes)} + mlocked {_fmt_bytes(host.mlocked_bytes)} "
                      f"not reclaimable")
        host_line = f"page cache {cache} reclaimable{pinned} · swap free {host.swap_free_bytes.text()} · PSI {psi}"
        gpus = self.query_one("#gpus", DataTable)
        gpus.clear()
        gpus.display = bool(snapshot.devices)
        for device in snapshot.devices:
            cc = ".".join(map(str, device.compute_capability)) if device.compute_capability else "n/a"
            kind = {True: "of pool", False: "VRAM", None: "memory?"}[device.unified]  # pool: shared with the host
            used = device.gpu_used_bytes.value / GIB if device.gpu_used_bytes.available else None
            total = device.memory_total_bytes.value / GIB if device.memory_total_bytes.available else None
            gpus.add_row(str(device.index), device.name.removeprefix("NVIDIA "),
                         f"{'n/a' if used is None else f'{used:.1f}'} / {'n/a' if total is None else f'{total:.1f}'} "
                         f"GiB {kind}",
                         _fmt_reading(device.utilization_pct, "%"), _fmt_reading(device.power_w, "W"),
                         _fmt_reading(device.temperature_c, "°C"), _fmt_reading(device.sm_clock_mhz, "MHz"), cc,
                         key=str(device.index))
        lines = [] if snapshot.devices else [f"GPU: none - {snapshot.nvml_status}"]
        lines.append(host_line)
        stats.update("\n".join(lines))

    def _show_history(self) -> None:
        """Used memory and headroom over the kept history (10 minutes at 1 s), in GiB from 0 to the pool's size:
        an absolute scale, so a flat line near the top means full, not "the same as a minute ago"."""
        history = list(self.app.history)
        plot = self.query_one("#history", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        if not history:
            plot.refresh()
            return
        last = history[-1]
        on_gpu = bool(last.devices)
        gpu = [_gpu_used(s) / GIB for s in history]
        headroom = [(s.headroom_for(on_gpu=True).value or 0) / GIB for s in history]
        ago = [s.timestamp_s - last.timestamp_s for s in history]
        span_s = -ago[0]
        span = f"{int(span_s // 60)}:{int(span_s % 60):02d}"
        total = _pool_total(last) / GIB
        used_name = "GPU used" if on_gpu else "host used"
        plt.title(f"{used_name} (max {max(gpu):.1f} GiB) and headroom (min {min(headroom):.1f} GiB) in GiB of "
                  f"{total:.1f}, the last {span} (x: seconds ago)")
        plt.plot(ago, gpu, color=theme_rgb(self.app, "accent"), marker="braille", label=f"{used_name}, GiB")
        plt.plot(ago, headroom, color=theme_rgb(self.app, "success"), marker="braille", label="headroom, GiB")
        plt.ylim(0, max(total, max(gpu), max(headroom), 1e-3))
        plt.xlim(min(ago[0], -1.0), 0)
        plt.frame(False)  # every row is data: at 80×24 a box and an axis title leave none
        plot.refresh()

    def _show_processes(self, snapshot: TelemetrySnapshot) -> None:
        table = self.query_one("#processes", DataTable)
        row = table.cursor_row
        table.clear()
        for proc in snapshot.processes:
            table.add_row(
                str(proc.pid),
                proc.name,
                format_bytes(proc.gpu_bytes) if proc.gpu_bytes else "-",
                format_bytes(proc.rss_bytes),
                "job" if proc.own_job else "",
                key=str(proc.pid),
            )
        if table.row_count:
            table.move_cursor(row=min(row, table.row_count - 1))


def _pool_total(snapshot: TelemetrySnapshot) -> float:
    """The size of the memory the history is drawn against: the card's VRAM, else the host's RAM."""
    device = snapshot.devices[0] if snapshot.devices else None
    if device is not None and not device.unified and device.memory_total_bytes.available:
        return device.memory_total_bytes.value or 0
    return snapshot.host.total_bytes.value or 0


def _gpu_used(snapshot: TelemetrySnapshot) -> float:
    if snapshot.devices:
        return sum(d.gpu_used_bytes.value or 0 for d in snapshot.devices)
    return snapshot.host.used_bytes.value or 0
