"""The run options dialog (``o`` on the plan screen): every option ``qexplorer run`` has that the plan screen's
keys do not toggle. It edits a core :class:`~qexplorer.core.session.RunOptions`; the run plan is core's."""

from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Select, Static

from qexplorer.core.session import RunOptions, RunOrder

REFERENCES = ("bf16", "fp32")


class RunOptionsScreen(ModalScreen[RunOptions | None]):
    BINDINGS = [Binding("escape", "dismiss", "Cancel")]

    def __init__(self, options: RunOptions) -> None:
        super().__init__()
        self.options = options

    def compose(self) -> ComposeResult:
        o = self.options
        with Vertical(id="options-dialog"):
            yield Static("[b]Run options[/b] - as `qexplorer run` takes them; enter or ctrl+s saves, escape cancels")
            with Grid(id="options-grid"):
                yield Label("evaluation text (--corpus)")
                yield Input(o.corpus or "", placeholder="default: shipped prose + Python stdlib", id="opt-corpus")
                yield Label("reference (--reference)")
                yield Select([(r, r) for r in REFERENCES], value=o.reference, allow_blank=False, id="opt-reference")
                yield Label("quality tokens (--quality-tokens)")
                yield Input(str(o.quality_tokens), type="integer", id="opt-tokens")
                yield Label("quality context (--quality-ctx)")
                yield Input(str(o.quality_ctx), type="integer", id="opt-ctx")
                yield Label("threads (--threads, 0: physical cores)")
                yield Input(str(o.bench.threads), type="integer", id="opt-threads")
                yield Label("repetitions (--repetitions)")
                yield Input(str(o.bench.repetitions), type="integer", id="opt-repetitions")
                yield Label("engine arguments (--engine-args)")
                yield Input(shlex.join(o.engine_args), placeholder="vLLM: --tensor-parallel-size 2", id="opt-engine")
                yield Label("order")
                yield Select([(str(r), r) for r in RunOrder], value=o.order, allow_blank=False, id="opt-order")
                yield Label("task items (--tasks-limit, empty: all)")
                yield Input("" if o.tasks_limit is None else str(o.tasks_limit), type="integer",
                            placeholder="164 HumanEval + 160 arith", id="opt-tasks-limit")
                yield Label("")
                yield Checkbox("run even when the plan says it does not fit (--force)", o.force, id="opt-force")
                yield Label("")
                yield Checkbox("run the model's HumanEval code without network isolation (--allow-unisolated-exec)",
                               o.allow_unisolated_exec, id="opt-unisolated")
            yield Button("Save", variant="primary", id="opt-save")

    def _int(self, widget_id: str, minimum: int) -> int:
        value = self.query_one(widget_id, Input).value.strip()
        if not value.isdigit() or int(value) < minimum:
            raise ValueError(f"{widget_id.removeprefix('#opt-')} must be a whole number of at least {minimum}")
        return int(value)

    def _read(self) -> RunOptions:
        corpus = self.query_one("#opt-corpus", Input).value.strip() or None
        if corpus is not None and not Path(corpus).expanduser().exists():
            raise ValueError(f"the evaluation text {corpus} does not exist")
        try:
            engine_args = tuple(shlex.split(self.query_one("#opt-engine", Input).value))
        except ValueError as exc:
            raise ValueError(f"engine arguments: {exc}") from None
        bench = replace(self.options.bench, threads=self._int("#opt-threads", 0),
                        repetitions=self._int("#opt-repetitions", 1))
        return replace(self.options, corpus=str(Path(corpus).expanduser()) if corpus else None,
                       reference=str(self.query_one("#opt-reference", Select).value),
                       quality_tokens=self._int("#opt-tokens", 64), quality_ctx=self._int("#opt-ctx", 16),
                       bench=bench, engine_args=engine_args,
                       order=RunOrder(self.query_one("#opt-order", Select).value),
                       force=self.query_one("#opt-force", Checkbox).value,
                       tasks_limit=self._int("#opt-tasks-limit", 1) if self.query_one(
                           "#opt-tasks-limit", Input).value.strip() else None,
                       allow_unisolated_exec=self.query_one("#opt-unisolated", Checkbox).value)

    @on(Button.Pressed, "#opt-save")
    @on(Input.Submitted)
    def _save(self) -> None:
        try:
            options = self._read()
        except ValueError as exc:
            self.notify(f"Not saved: {exc}.", severity="warning")
            return
        self.dismiss(options)
