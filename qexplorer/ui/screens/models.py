"""The model picker: every model qexplorer found, filter as you type."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static

from qexplorer.core.catalog import CatalogEntry
from qexplorer.core.units import format_bytes, format_count


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def entry_matches(entry: CatalogEntry, needle: str) -> bool:
    if not needle:
        return True
    spec = entry.spec
    haystack = " ".join([entry.ref, entry.source] + ([spec.name, spec.architecture, spec.stored_dtype] if spec else []))
    return all(word in haystack.lower() for word in needle.lower().split())


class ModelPickerScreen(Screen):
    """Pick the model to plan, quantize and benchmark."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("down", "focus_table", "Table", show=False),
        Binding("slash", "focus_filter", "Filter"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder="filter: type to narrow (name, architecture, source, dtype)", id="model-filter")
        yield Static("", id="model-count")
        table: DataTable = DataTable(id="model-table", cursor_type="row", zebra_stripes=True)
        table.add_columns("model", "params", "architecture", "stored", "on disk", "source")
        yield table
        yield Static("", id="model-detail")
        yield Footer()

    def on_mount(self) -> None:
        self.watch(self.app, "catalog_entries", lambda _: self._fill())
        self.query_one("#model-filter", Input).focus()

    def _visible(self) -> list[CatalogEntry]:
        needle = self.query_one("#model-filter", Input).value
        return [e for e in self.app.catalog_entries if entry_matches(e, needle)]

    def _fill(self) -> None:
        table = self.query_one("#model-table", DataTable)
        table.clear()
        entries = self._visible()
        muted = self.app.theme_variables.get("text-muted", "")
        error = self.app.theme_variables.get("text-error", "")
        for entry in entries:
            spec = entry.spec
            if spec is None:
                table.add_row(Text("  " + _clip(entry.ref, 26), style=error), "", Text("unreadable", style=error),
                              "", "", Text(entry.source, style=muted), key=entry.ref)
                continue
            params = format_count(spec.total_params)
            if spec.is_moe:
                params += f" ({format_count(spec.active_params)})"
            current = self.app.model is not None and spec.path == self.app.model.path
            name = Text(("● " if current else "  ") + _clip(spec.name, 26))
            table.add_row(name, params, spec.architecture.removesuffix("ForCausalLM"), spec.stored_dtype,
                          format_bytes(spec.size_on_disk_bytes), Text(entry.source, style=muted), key=entry.ref)
        total = len(self.app.catalog_entries)
        scanning = " · scanning…" if self.app.catalog_scanning else ""
        self.query_one("#model-count", Static).update(
            f"{len(entries)} of {total} models{scanning} · params in parentheses: active (MoE) · "
            "Enter picks, / filters, Esc goes back")
        self._show_error_row()

    def _show_error_row(self) -> None:
        table = self.query_one("#model-table", DataTable)
        entries = self._visible()
        row = table.cursor_row
        detail = self.query_one("#model-detail", Static)
        if 0 <= row < len(entries) and entries[row].error:
            detail.update(f"{entries[row].ref}: {entries[row].error}")
        elif 0 <= row < len(entries) and entries[row].spec:
            spec = entries[row].spec
            detail.update(
                f"{Path(spec.path).name} · {spec.n_layers} layers, hidden {spec.hidden_size}, {spec.n_heads} heads / "
                f"{spec.n_kv_heads} KV heads × {spec.head_dim}, vocab {spec.vocab_size:,}, "
                f"max context {spec.max_context:,} · params from {spec.params_source}")
        else:
            detail.update("")

    def on_data_table_row_highlighted(self, _event: DataTable.RowHighlighted) -> None:
        self._show_error_row()

    @on(Input.Changed, "#model-filter")
    def _filter_changed(self) -> None:
        self._fill()

    @on(Input.Submitted, "#model-filter")
    def _filter_submitted(self) -> None:
        entries = self._visible()
        if entries:
            self._pick(entries[0])

    @on(DataTable.RowSelected, "#model-table")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        ref = event.row_key.value
        entry = next((e for e in self.app.catalog_entries if e.ref == ref), None)
        if entry is not None:
            self._pick(entry)

    def _pick(self, entry: CatalogEntry) -> None:
        if entry.spec is None:
            self.notify(entry.error or "This model cannot be read.", severity="error", timeout=8)
            return
        self.app.model = entry.spec
        self.app.action_plan()

    def action_focus_table(self) -> None:
        self.query_one("#model-table", DataTable).focus()

    def action_focus_filter(self) -> None:
        self.query_one("#model-filter", Input).focus()
