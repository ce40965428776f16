"""The live memory dashboard: the truth about GPU and host memory, every second."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Sparkline, Static

from qexplorer.core.breakdown import breakdowns
from qexplorer.core.kinds import NvmlState
from qexplorer.core.telemetry import Reading, TelemetrySnapshot
from qexplorer.core.units import format_bytes, format_gib
from qexplorer.ui.widgets.memory_bar import MemoryBar

REFRESH_STEPS_S = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0)


def _fmt_bytes(reading: Reading) -> str:
    return format_gib(reading.value) if reading.available else "n/a"


def _fmt_reading(reading: Reading, unit: str, fmt: str = "{:.0f}") -> str:
    if reading.value is None:
        return "n/a"
    return f"{fmt.format(reading.value)} {unit}"


class DashboardScreen(Screen):
    """Memory bars, history, GPU gauges and the process table."""

    BINDINGS = [
        Binding("plus,equals_sign", "faster", "Rate ±", key_display="+/-"),
        Binding("minus", "slower", "Slower", show=False),
        Binding("space", "toggle_pause", "Pause"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("waiting for the first sample…", id="banner")
        yield Vertical(id="bars")
        yield Static("", id="gpu-stats")
        with Horizontal(classes="history-row"):
            yield Static("GPU used", classes="history-label", id="gpu-history-label")
            yield Sparkline([], id="gpu-history", summary_function=max)
        with Horizontal(classes="history-row"):
            yield Static("headroom", classes="history-label", id="headroom-history-label")
            yield Sparkline([], id="headroom-history", summary_function=min)
        table: DataTable = DataTable(id="processes", cursor_type="row", zebra_stripes=True)
        table.add_columns("PID", "process", "GPU", "RSS", "")
        yield table
        yield Footer()

    def on_mount(self) -> None:
        self.watch(self.app, "snapshot", self._show_snapshot)
        self.watch(self.app, "refresh_s", lambda _: self._show_snapshot(self.app.snapshot))
        self.watch(self.app, "paused", lambda _: self._show_snapshot(self.app.snapshot))

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
    def _show_snapshot(self, snapshot: TelemetrySnapshot | None) -> None:
        if snapshot is None:
            return
        with self.app.batch_update():
            self._show_banner(snapshot)
            self._show_bars(snapshot)
            self._show_gpu_stats(snapshot)
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
        lines = []
        for device in snapshot.devices:
            cc = ".".join(map(str, device.compute_capability)) if device.compute_capability else "n/a"
            lines.append(
                f"GPU {device.index}: util {_fmt_reading(device.utilization_pct, '%')} · "
                f"{_fmt_reading(device.power_w, 'W')} · {_fmt_reading(device.temperature_c, '°C')} · "
                f"SM {_fmt_reading(device.sm_clock_mhz, 'MHz')} · CC {cc}"
            )
        if not snapshot.devices:
            lines.append(f"GPU: none - {snapshot.nvml_status}")
        lines.append(host_line)
        stats.update("\n".join(lines))

    def _show_history(self) -> None:
        history = list(self.app.history)
        if not history:
            return
        gpu = [_gpu_used(s) for s in history]
        headroom = [s.headroom_for(on_gpu=True).value or 0 for s in history]
        span_s = history[-1].timestamp_s - history[0].timestamp_s
        span = f"{int(span_s // 60)}:{int(span_s % 60):02d}"
        gpu_name = "GPU used" if history[-1].devices else "host used"
        self.query_one("#gpu-history", Sparkline).data = gpu
        self.query_one("#headroom-history", Sparkline).data = headroom
        self.query_one("#gpu-history-label", Static).update(
            f"{gpu_name} {span}\nmax {format_gib(max(gpu))}"
        )
        self.query_one("#headroom-history-label", Static).update(
            f"headroom {span}\nmin {format_gib(min(headroom))}"
        )

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


def _gpu_used(snapshot: TelemetrySnapshot) -> float:
    if snapshot.devices:
        return sum(d.gpu_used_bytes.value or 0 for d in snapshot.devices)
    return snapshot.host.used_bytes.value or 0
