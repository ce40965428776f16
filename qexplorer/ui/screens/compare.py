"""The compare screen: every measured precision side by side, plots, a recommendation, exports."""

from __future__ import annotations

import math

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static
from textual_plotext import PlotextPlot

from qexplorer.core.compare import (
    PRIORITIES,
    SORT_KEYS,
    CompareRow,
    filter_rows,
    pareto_front,
    recommend,
    sort_rows,
)
from qexplorer.core.kinds import SupportMode
from qexplorer.core.planner import hardware_from_snapshot
from qexplorer.core.quality import kld_name
from qexplorer.core.tasks.run import ARITH
from qexplorer.core.tasks.run import KNOWN as KNOWN_TASKS
from qexplorer.core.tasks.summary import task_title
from qexplorer.core.units import MIB, format_bytes
from qexplorer.ui.screens.live import watch_while_shown
from qexplorer.ui.widgets.plots import theme_rgb

FAMILIES = ("all", "torch", "gguf", "server")
TASK_COLUMNS = tuple(task_title(t) + " (95 % CI)" for t in KNOWN_TASKS)
COLUMNS = ("precision", "engine", "weights", "decode tok/s", kld_name(), "top-1", "PPL", *TASK_COLUMNS,
           "task recovery", "streams in SLO", "prefill tok/s", "TTFT", "deeper", "roof %", "peak RSS", "peak GPU")


def _se(mean: float | None, se: float | None, fmt: str, unit: str = "") -> str:
    """A quality figure with its standard error (the speed columns carry sd over repetitions instead)."""
    if mean is None:
        return "n/a"
    return fmt.format(mean) + (f"±{fmt.format(se)}" if se is not None else "") + unit


def _task_cell(row: CompareRow, task: str) -> str:
    score = row.task(task)
    if score is None or score.accuracy is None:
        return "failed (see its log)" if row.task_error else "-"
    return f"{100 * score.accuracy:.1f} % [{100 * score.low:.1f}–{100 * score.high:.1f}]"


def _recovery_cell(row: CompareRow) -> str:
    """Each task's recovery against the reference, ▼ where the loss is significant (exact McNemar)."""
    cells = []
    for task in KNOWN_TASKS:
        score = row.task(task)
        if score is None:
            continue
        test = score.versus_reference
        mark = "▼" if test is not None and test.significant and (test.difference or 0.0) < 0 else ""
        cells.append("ref" if row.is_reference else f"{score.recovery:.2f}{mark}" if score.recovery is not None
                     else "n/a")
    return " / ".join(cells) or "-"


def _streams_cell(row: CompareRow) -> str:
    """Streams within the objective and their output tok/s; "none" when no concurrency met it, "-" unswept."""
    load = row.load
    if load is None:
        return "-"
    if load.streams is None or load.output_tok_s is None:
        return "none"
    return f"{load.streams} @ {load.output_tok_s:.1f} tok/s"


def _pm(mean: float | None, sd: float | None, fmt: str = "{:.1f}") -> str:
    if mean is None:
        return "n/a"
    return f"{fmt.format(mean)}±{fmt.format(sd or 0.0)}"


class CompareScreen(Screen):
    """Measured results of the current model (latest run per precision)."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("s", "sort", "Sort"),
        Binding("f", "family", "Family"),
        Binding("o", "priority", "Priority"),
        Binding("e", "export_results", "Export"),
        Binding("x", "export_model", "Export model"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.sort_key = "precision"
        self.family = "all"
        self.priority = "quality"
        self._rows: list[CompareRow] = []
        self._summary = ""

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="compare-summary")
        table: DataTable = DataTable(id="compare-table", cursor_type="row", zebra_stripes=True)
        table.add_columns(*COLUMNS)
        yield table
        with Horizontal(id="compare-plots"):
            yield PlotextPlot(id="plot-speed")
            yield PlotextPlot(id="plot-quality")
            yield PlotextPlot(id="plot-pareto")
            yield PlotextPlot(id="plot-chains")
            yield PlotextPlot(id="plot-load")
        with VerticalScroll(id="recommendation"):
            yield Static("", id="recommendation-text")
        yield Footer()

    def on_mount(self) -> None:
        watch_while_shown(self, ("compare_rows", "snapshot"), self._refresh)
        self.app.load_results()
        self._refresh()
        self.query_one("#compare-table", DataTable).focus()

    # ------------------------------------------------------------------ data
    def _visible(self) -> list[CompareRow]:
        return sort_rows(filter_rows(self.app.compare_rows, self.family), self.sort_key)

    def on_screen_resume(self) -> None:
        self._refresh()

    def _refresh(self) -> None:
        self._rows = self._visible()
        table = self.query_one("#compare-table", DataTable)
        row = table.cursor_row
        table.clear()
        front = {r.precision for r in pareto_front(self._rows)}
        for r in self._rows:
            marks = {SupportMode.EMULATED: "*", SupportMode.DEQUANTIZED: "†", SupportMode.WEIGHT_ONLY: "ʷ"}.get(r.mode, "")
            label = ("≠ " if not r.compared else "") + r.label + marks + ("ᵏ" if r.kernel_mismatch else "") + (
                " (quick)" if r.first_pass else "") + (" ◆" if r.precision in front else "")
            noisy = "~" if r.noise else ""
            at = f" d{r.depth}" if r.depth else ""
            table.add_row(
                label, r.engine or "-", format_bytes(r.memory_bytes), _pm(r.decode_tok_s, r.decode_sd) + noisy + at,
                "reference" if r.is_reference else _se(r.kld, r.kld_se, "{:.4f}"),
                "reference" if r.is_reference else _se(r.top1_pct, r.top1_se_pct, "{:.1f}", " %"),
                _se(r.ppl, r.ppl_se, "{:.2f}"),
                *(_task_cell(r, task) for task in KNOWN_TASKS), _recovery_cell(r), _streams_cell(r),
                _pm(r.prefill_tok_s, r.prefill_sd, "{:.0f}") + noisy,
                f"{r.ttft_s * 1000:.0f} ms" if r.ttft_s is not None else "n/a",
                " ".join(f"d{d.depth} {d.decode_tok_s:.0f}±{d.decode_sd:.0f}" + ("~" if d.noisy else "")
                         + (f" ({d.roofline_pct:.0f} %)" if d.roofline_pct is not None else "")
                         for d in r.depths) or "-",
                ("!" if r.roofline_suspect else "") + f"{r.roofline_pct:.0f}" if r.roofline_pct is not None else "n/a",
                format_bytes(r.peak_bytes), format_bytes(r.peak_gpu_bytes) if r.peak_gpu_bytes is not None else "no GPU",
                key=r.precision,
            )
        if table.row_count:
            table.move_cursor(row=min(max(row, 0), table.row_count - 1))
        model = self.app.model.name if self.app.model else "no model"
        # the full legend is on the help screen
        notes = ["* emulated", "◆ Pareto", "speed mean±sd, quality mean±SE", "dN: at depth N"]
        if any(t.versus_reference is not None and t.versus_reference.significant for r in self._rows for t in r.tasks):
            notes.append("▼ significant task loss vs the reference")
        if any(r.noise for r in self._rows):
            notes.append("~ noisy")
        if any(r.fallback for r in self._rows):
            notes.insert(1, "† fallback")
        if any(r.kernel_mismatch for r in self._rows):
            notes.append("ᵏ vLLM picked another kernel than planned (details: the row)")
        if any(r.mode == SupportMode.WEIGHT_ONLY for r in self._rows):
            notes.append("ʷ served weight-only (activations not quantized)")
        if any(not r.compared for r in self._rows):
            notes.append("≠ other settings: shown, not ranked")
        if any(r.first_pass for r in self._rows):
            notes.append("(quick): the first answer, replaced when the full figures land")
        if any(r.roofline_suspect for r in self._rows):
            notes.append("!roof > 100 %: a wrong bound, not a fact")
        sim = f"[reverse] SIMULATED {self.app.snapshot.simulated} [/reverse] " if (
            self.app.snapshot and self.app.snapshot.simulated) else ""
        error = f"\n{self.app.results_error}" if self.app.results_error else ""
        self._summary = (f"[b]{model}[/b] · {len(self._rows)} measured · sort {self.sort_key} · {self.family}\n"
                         f"{sim}{' · '.join(notes)}{error}")
        self._show_summary()
        self._plots()
        self._recommend()
        self.call_after_refresh(self._show_summary)

    def _show_summary(self) -> None:
        """The summary, and which columns the table's width leaves off screen (they scroll into view with →)."""
        table = self.query_one("#compare-table", DataTable)
        hidden: list[str] = []
        if table.size.width:
            edge = table.scroll_x + table.scrollable_content_region.width
            left = 0
            for column in table.ordered_columns:
                left += column.get_render_width(table)
                if left > edge:
                    hidden.append(str(column.label))
        more = f"\n[b]→ {len(hidden)} more columns:[/b] {', '.join(hidden)}" if hidden else ""
        self.query_one("#compare-summary", Static).update(self._summary + more)

    def _selected(self) -> CompareRow | None:
        row = self.query_one("#compare-table", DataTable).cursor_row
        return self._rows[row] if 0 <= row < len(self._rows) else None

    def on_data_table_row_highlighted(self, _event: DataTable.RowHighlighted) -> None:
        self._plots()

    # ------------------------------------------------------------------ plots
    def _plots(self) -> None:
        selected = self._selected()
        accent, muted = theme_rgb(self.app, "accent"), theme_rgb(self.app, "primary")
        self._bars("#plot-speed", "decode tok/s", [r.decode_tok_s or 0.0 for r in self._rows], selected)
        self._bars("#plot-quality", "KLD vs reference", [r.kld or 0.0 for r in self._rows], selected)
        self._chains(selected)
        self._load(selected)

        pareto = self.query_one("#plot-pareto", PlotextPlot)
        plt = pareto.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("KLD vs weights (MiB)")
        points = [r for r in self._rows if r.kld is not None and r.memory_bytes is not None]
        if points:
            front = pareto_front(points)
            plt.plot([r.memory_bytes / MIB for r in front], [r.kld for r in front],
                     color=theme_rgb(self.app, "success"), marker="braille", label="Pareto front")
            plt.scatter([r.memory_bytes / MIB for r in points], [r.kld for r in points], color=muted, marker="●")
            if selected is not None and selected in points:
                plt.scatter([selected.memory_bytes / MIB], [selected.kld], color=accent, marker="◆")
        pareto.refresh()

    def _shown_plot(self, selector: str, title: str, shown: bool) -> PlotextPlot | None:
        """A plot shown only while some row has its data: cleared and titled, or hidden (None)."""
        widget = self.query_one(selector, PlotextPlot)
        widget.display = shown
        if not shown:
            return None
        widget.plt.clear_data()
        widget.plt.clear_figure()
        widget.plt.title(title)
        return widget

    def _chains(self, selected: CompareRow | None) -> None:
        """Arithmetic accuracy by chain length, one line per precision (shown only once one has it): where a
        precision breaks as chains grow."""
        measured = [(r, r.task(ARITH)) for r in self._rows if r.task(ARITH) is not None and r.task(ARITH).per_length]
        widget = self._shown_plot("#plot-chains", "arith % by chain length", bool(measured))
        if widget is None:
            return
        plt = widget.plt
        for row, score in measured:
            lengths = [length for length, _fraction in score.length_accuracy]
            percent = [100 * fraction for _length, fraction in score.length_accuracy]
            color = theme_rgb(self.app, "accent" if row is selected else "primary")
            plt.plot(lengths, percent, marker="braille", color=color, label=row.precision.upper())
        plt.ylim(0, 100)
        widget.refresh()

    def _load(self, selected: CompareRow | None) -> None:
        """Output tok/s (all streams) by concurrency, one line per row with a load sweep (shown only once one has
        it), ◆ the selected row's goodput; the concurrency axis is log2 (the sweep doubles it), labelled with the
        concurrencies themselves."""
        swept = [r for r in self._rows if r.load is not None and r.load.curve]
        widget = self._shown_plot("#plot-load", "tok/s by concurrency", bool(swept))
        if widget is None:
            return
        plt = widget.plt
        for row in swept:  # only the selected line is named: a legend of every row covers a narrow plot
            selected_row = row is selected
            plt.plot([math.log2(c) for c, _tok_s in row.load.curve], [tok_s for _c, tok_s in row.load.curve],
                     marker="braille", color=theme_rgb(self.app, "accent" if selected_row else "primary"),
                     label=row.precision.upper() if selected_row else None)
        if selected is not None and selected.load is not None and selected.load.streams is not None:
            plt.scatter([math.log2(selected.load.streams)], [selected.load.output_tok_s or 0.0],
                        color=theme_rgb(self.app, "accent"), marker="◆")
        levels = sorted({c for r in swept for c, _tok_s in r.load.curve})
        plt.xticks([math.log2(c) for c in levels], [str(c) for c in levels])
        widget.refresh()

    def _bars(self, selector: str, title: str, values: list[float], selected: CompareRow | None) -> None:
        """Horizontal bars at numeric positions (labels as ticks), the selected row redrawn in the accent."""
        widget = self.query_one(selector, PlotextPlot)
        plt = widget.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(title)
        if self._rows:
            positions = list(range(1, len(self._rows) + 1))
            plt.bar(positions, values, orientation="h", width=0.6, color=theme_rgb(self.app, "primary"))
            if selected is not None and selected in self._rows:
                index = self._rows.index(selected)
                plt.bar([positions[index]], [values[index]], orientation="h", width=0.6,
                        color=theme_rgb(self.app, "accent"))
            # Label every bar or none: with fewer rows than bars plotext's choice of labels varies
            # between renders; the table above names every row.
            if widget.size.height - 4 >= len(positions):
                plt.yticks(positions, [r.precision.upper().replace("_RTN", "") for r in self._rows])
            else:
                plt.yticks([])
        widget.refresh()

    def on_resize(self) -> None:
        self.call_after_refresh(self._plots)
        self.call_after_refresh(self._show_summary)
        self.call_after_refresh(self._mark_overflow)

    # ------------------------------------------------------------------ recommendation
    def _recommend(self) -> None:
        snapshot = self.app.snapshot
        hardware = hardware_from_snapshot(snapshot)
        headroom = snapshot.headroom_for(hardware.cuda).value if snapshot else None
        result = recommend(self.app.compare_rows, hardware, None if headroom is None else int(headroom),
                           self.priority)
        text = Text()
        text.append(f"Recommendation ({self.priority} first): ", style="bold")
        text.append(result.label, style=f"bold {self.app.theme_variables.get('text-success', '')}")
        text.append("\n" + result.text)
        self.query_one("#recommendation-text", Static).update(text)
        self.recommendation = result
        self.call_after_refresh(self._mark_overflow)

    def _mark_overflow(self) -> None:
        """A recommendation longer than its box says so on the border: nothing is cut off silently."""
        box = self.query_one("#recommendation", VerticalScroll)
        box.border_subtitle = "more ↓ (tab here, then ↓)" if box.max_scroll_y > 0 else ""

    # ------------------------------------------------------------------ actions
    def action_sort(self) -> None:
        self.sort_key = SORT_KEYS[(SORT_KEYS.index(self.sort_key) + 1) % len(SORT_KEYS)]
        self._refresh()

    def action_family(self) -> None:
        self.family = FAMILIES[(FAMILIES.index(self.family) + 1) % len(FAMILIES)]
        self._refresh()

    def action_priority(self) -> None:
        self.priority = PRIORITIES[(PRIORITIES.index(self.priority) + 1) % len(PRIORITIES)]
        self._recommend()

    def action_export_results(self) -> None:
        self.app.export_results()

    def action_export_model(self) -> None:
        row = self._selected()
        if row is not None:
            self.app.export_model(row.precision)
