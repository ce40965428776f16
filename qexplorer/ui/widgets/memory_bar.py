"""A stacked memory bar with its legend, coloured by the theme."""

from __future__ import annotations

from rich.cells import cell_len
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from qexplorer.core.breakdown import MemoryBreakdown
from qexplorer.core.units import format_gib


class MemoryBar(Widget):
    """Draws one :class:`MemoryBreakdown`: title, bar, legend."""

    DEFAULT_CSS = """
    MemoryBar { height: auto; padding: 0 1; }
    MemoryBar > .memory-bar--title { text-style: bold; }
    MemoryBar > .memory-bar--gpu { color: $accent; }
    MemoryBar > .memory-bar--host { color: $secondary; }
    MemoryBar > .memory-bar--free { color: $success; }
    MemoryBar > .memory-bar--reserve { color: $warning; }
    MemoryBar > .memory-bar--danger { color: $error; text-style: bold; }
    MemoryBar > .memory-bar--muted { color: $text-muted; }
    """
    COMPONENT_CLASSES = {
        "memory-bar--title", "memory-bar--gpu", "memory-bar--host", "memory-bar--free",
        "memory-bar--reserve", "memory-bar--danger", "memory-bar--muted",
    }

    breakdown: reactive[MemoryBreakdown | None] = reactive(None, layout=True)

    def __init__(self, breakdown: MemoryBreakdown | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.set_reactive(MemoryBar.breakdown, breakdown)

    def _style(self, name: str):
        return self.get_component_rich_style(f"memory-bar--{name}")

    def render(self) -> Text:
        b = self.breakdown
        if b is None:
            return Text("waiting for the first sample…", style=self._style("muted"))
        text = Text()
        text.append(b.title, style=self._style("title"))
        text.append(f"  {format_gib(b.total_bytes)} total" if b.total_bytes else "  total unknown",
                    style=self._style("muted"))
        headroom = b.headroom.value
        if headroom is not None:
            style = self._style("danger") if headroom < 0 else self._style("title")
            text.append("  headroom ", style=self._style("muted"))
            text.append(format_gib(headroom), style=style)
        text.append("\n")
        width = max(10, self.size.width)
        if not b.segments or not b.total_bytes:
            text.append("░" * width, style=self._style("muted"))
            text.append(f"\n{b.note or b.headroom.note or 'memory figures unavailable'}", style=self._style("muted"))
            return text
        text.append_text(self._bar(b, width))
        text.append("\n")
        text.append_text(self._legend(b, width))
        return text

    def _legend(self, b: MemoryBreakdown, width: int) -> Text:
        """One entry per segment (MemFree beside MemAvailable on unified memory) and the reserve, wrapped between
        entries, never inside one: "▒" stays with "reserve"."""
        entries: list[Text] = []
        for segment in b.segments:
            entry = Text()
            entry.append("■ ", style=self._style(segment.role))
            entry.append(f"{segment.label} {format_gib(segment.bytes)}")
            if segment.role == "free" and b.mem_free is not None:
                entry.append(" (MemFree ")
                free = format_gib(b.mem_free.value) if b.mem_free.available else "n/a"
                entry.append(free, style=self._style("danger") if b.mem_free_low else "")
                entry.append(")")
            entry.append("  ")
            entries.append(entry)
        if b.reserve_bytes:
            entry = Text()
            entry.append("▒ ", style=self._style("reserve"))
            entry.append(f"reserve {format_gib(b.reserve_bytes)}")
            entries.append(entry)
        legend, line_cells = Text(), 0
        for entry in entries:
            if line_cells and line_cells + cell_len(entry.plain.rstrip()) > width:
                legend.append("\n")
                line_cells = 0
            legend.append_text(entry)
            line_cells += entry.cell_len
        return legend

    def _bar(self, b: MemoryBreakdown, width: int) -> Text:
        assert b.total_bytes
        bar = Text()
        used_cells = 0
        for i, segment in enumerate(b.segments):
            last = i == len(b.segments) - 1
            cells = width - used_cells if last else round(segment.bytes / b.total_bytes * width)
            cells = max(0, min(cells, width - used_cells))
            if segment.role == "free" and b.reserve_bytes:
                reserve_cells = min(cells, max(1, round(b.reserve_bytes / b.total_bytes * width)))
                danger = segment.bytes <= b.reserve_bytes
                bar.append("░" * (cells - reserve_cells), style=self._style("free"))
                bar.append("▒" * reserve_cells, style=self._style("danger" if danger else "reserve"))
            else:
                bar.append(("█" if segment.role != "free" else "░") * cells, style=self._style(segment.role))
            used_cells += cells
        return bar
