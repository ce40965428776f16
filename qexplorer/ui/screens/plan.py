"""The precision picker: one row per precision with its planned memory and verdict."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from qexplorer.core.capacity import Capacity, sequences_text
from qexplorer.core.eta import format_duration
from qexplorer.core.planner import (
    KV_DTYPE_BYTES,
    PlanRequest,
    PrecisionPlan,
    VllmServePlan,
    hardware_from_snapshot,
    plan_model,
)
from qexplorer.core.units import format_bytes, format_count, format_gib
from qexplorer.ui.screens.live import watch_while_shown

CONTEXT_MIN, CONTEXT_MAX = 256, 1 << 20
VERDICT_STYLE = {"fits": "text-success", "tight": "text-warning", "does not fit": "text-error", "unknown": "text-muted"}


class PlanScreen(Screen):
    """Plans for every precision against live headroom; choose the ones to run."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("space", "toggle", "Select"),
        Binding("left_square_bracket", "context(0.5)", "Context", key_display="[ ]"),
        Binding("right_square_bracket", "context(2)", "Context ×2", show=False),
        Binding("k", "kv_dtype", "KV dtype", show=False),
        Binding("r", "run", "Run"),
        Binding("b", "toggle_quick", "Quick", show=False),
        Binding("D", "depth", "Depth", show=False),  # d is the dashboard everywhere
        Binding("v", "toggle_quality", "Quality", show=False),
        Binding("M", "toggle_remeasure", "Re-measure", show=False),
        Binding("t", "toggle_tasks", "Tasks", show=False),
        Binding("l", "toggle_load", "Load sweep", show=False),
        Binding("a", "select_all", "All/none", show=False),
        Binding("o", "options", "Options", show=False),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="plan-summary")
        yield DataTable(id="plan-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="plan-detail")
        yield Footer()

    def on_mount(self) -> None:
        watch_while_shown(self, ("snapshot", "model", "context", "kv_dtype", "chosen", "quick_bench", "bench_depths",
                                 "measure_quality", "remeasure", "measure_tasks", "measure_load"),
                         self._refresh_plans)
        self._refresh_plans()
        self.query_one("#plan-table", DataTable).focus()

    def on_screen_resume(self) -> None:
        self._refresh_plans()

    def _plans(self) -> list[PrecisionPlan]:
        app = self.app
        if app.model is None:
            return []
        return plan_model(app.model, PlanRequest(context=app.context, kv_dtype=app.kv_dtype), app.snapshot)

    def _refresh_plans(self) -> None:
        app = self.app
        summary = self.query_one("#plan-summary", Static)
        table = self.query_one("#plan-table", DataTable)
        if app.model is None:
            summary.update("No model chosen yet: press m to pick one.")
            return
        plans = self._plans()
        self._plans_cache = plans
        spec, snap = app.model, app.snapshot
        planned = app.planned_jobs()
        estimates = app.shown_estimates(planned)
        eta: dict[str, list] = {}  # a precision's jobs: its quick first answer and its full measurement
        for estimate in estimates:
            eta.setdefault(estimate.precision, []).append(estimate)
        self._eta = eta
        queue_s = sum(e.total_s for e in estimates)
        order = planned.order_text
        sources = {e.source for e in estimates}
        quick = [e.total_s for e in estimates if e.first_pass]
        first = f" (every precision answered quick within {format_duration(sum(quick))})" if quick else ""
        eta_line = (f"\n{len(estimates)} jobs{first}, at most {format_duration(queue_s)} one after another (estimated "
                    f"{sources.pop() if len(sources) == 1 else 'partly from defaults'}; overlapping shortens it), "
                    f"started {order}") if estimates else "\nno job selected"
        hardware = hardware_from_snapshot(snap)
        headroom = snap.headroom_for(hardware.cuda).value if snap else None
        sim = f" · [reverse] SIMULATED {snap.simulated} [/reverse]" if snap and snap.simulated else ""
        active = f" ({format_count(spec.active_params)} active)" if spec.is_moe else ""
        summary.update(
            f"[b]{spec.name}[/b] · {format_count(spec.total_params)} params{active}\n"
            f"context {app.context:,} tok · KV cache {app.kv_dtype} "
            f"{format_bytes(plans[0].kv_cache_bytes) if plans else 'n/a'} · "
            f"target {hardware.label}{sim}\nheadroom {format_gib(headroom)} "
            f"(reserve {format_gib(snap.reserve_bytes) if snap else 'n/a'}) · estimated\n"
            f"{app.bench_config().describe()} · quality {'on' if app.measure_quality else 'off'} "
            f"(b quick, D depth, v quality, o options){' · re-measure (M)' if app.remeasure else ''}"
            f"{_options_line(app.run_options())}{eta_line}"
        )
        row = table.cursor_row
        if getattr(self, "_columns_context", None) != app.context:  # the capacity column's header names it
            table.clear(columns=True)
            table.add_columns("precision", "est. time", "bpw", "weights", "total", "margin",
                              f"seqs @ {app.context:,}", "verdict", "runs here")
            self._columns_context = app.context
        table.clear()
        colours = app.theme_variables
        for plan in plans:
            chosen = plan.precision in app.chosen
            label = Text(("✔ " if chosen else "  ") + plan.label, style="bold" if chosen else "")
            verdict = Text(plan.verdict, style=colours.get(VERDICT_STYLE[plan.verdict], ""))
            engine = f"{plan.engine}†" if plan.engine == "transformers" else str(plan.engine)
            runs = Text(f"{engine} {plan.support}",
                        style=colours.get("text-warning", "") if plan.support != "native" else "")
            jobs = eta.get(plan.precision)
            table.add_row(
                label, f"~{format_duration(sum(e.total_s for e in jobs))}" if jobs else "", f"{plan.bits_per_weight:.2f}",
                format_bytes(plan.weight_bytes), format_bytes(plan.total_bytes),
                format_bytes(plan.margin_bytes) if plan.margin_bytes is not None else "n/a",
                sequences_text(plan.capacity.sequences if plan.capacity else None), verdict, runs, key=plan.precision,
            )
        if table.row_count:
            table.move_cursor(row=min(row, table.row_count - 1))
        self._show_detail()

    def on_data_table_row_highlighted(self, _event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    def _current(self) -> PrecisionPlan | None:
        plans = getattr(self, "_plans_cache", [])
        row = self.query_one("#plan-table", DataTable).cursor_row
        return plans[row] if 0 <= row < len(plans) else None

    def _show_detail(self) -> None:
        plan = self._current()
        detail = self.query_one("#plan-detail", Static)
        if plan is None:
            detail.update("")
            return
        group = f", group size {plan.group_size}" if plan.group_size else ""
        overhead = (f"vLLM on the GPU: {plan.vllm.overhead_source}" if plan.vllm and plan.runs_on == "GPU"
                    else "runtime + one 512-token prefill chunk")
        detail.update(
            f"{plan.label}: {plan.engine}, {plan.support} on {plan.runs_on} ({plan.support_note}){group}; "
            f"serve with {' / '.join(plan.servers)}. KV {format_bytes(plan.kv_bytes_per_token)}/token; "
            f"overhead {format_bytes(plan.overhead_bytes)} ({overhead})." + (_vllm_line(plan.vllm) if plan.vllm else "")
            + (_capacity_line(plan.capacity) if plan.capacity else "")
            + _projection_line(getattr(self, "_eta", {}).get(plan.precision, [None])[-1])
        )

    # ------------------------------------------------------------------ actions
    def action_toggle(self) -> None:
        plan = self._current()
        if plan is None:
            return
        chosen = set(self.app.chosen)
        chosen.symmetric_difference_update({plan.precision})
        self.app.chosen = frozenset(chosen)

    def action_select_all(self) -> None:
        plans = getattr(self, "_plans_cache", [])
        everything = frozenset(p.precision for p in plans)
        self.app.chosen = frozenset() if self.app.chosen >= everything else everything

    def action_context(self, factor: float) -> None:
        self.app.context = int(min(CONTEXT_MAX, max(CONTEXT_MIN, self.app.context * factor)))

    def action_run(self) -> None:
        self.app.queue_chosen()

    def action_toggle_quick(self) -> None:
        self.app.quick_bench = not self.app.quick_bench
        bench = self.app.bench_config()
        self.notify(f"Benchmark: pp{bench.prompt_tokens} / tg{bench.gen_tokens} × {bench.repetitions}"
                    + (" (quick)" if self.app.quick_bench else " (llama-bench default)"), timeout=4)

    def action_depth(self) -> None:
        from qexplorer.core.domain.bench import depth_choices

        choices = depth_choices(self.app.context, self.app.bench_config())
        current = self.app.bench_depths
        self.app.bench_depths = choices[(choices.index(current) + 1) % len(choices)] if current in choices else (0,)

    def action_toggle_quality(self) -> None:
        self.app.measure_quality = not self.app.measure_quality
        self.notify("Quality (KLD, top-1, PPL vs BF16): " + ("on" if self.app.measure_quality else "off"), timeout=4)

    def action_toggle_tasks(self) -> None:
        self.app.measure_tasks = not self.app.measure_tasks
        self.notify("Task pass (HumanEval and arithmetic chains after each full benchmark, same engine): "
                    + ("on" if self.app.measure_tasks else "off"), timeout=4)

    def action_toggle_load(self) -> None:
        self.app.measure_load = not self.app.measure_load
        self.notify("Load sweep (concurrency 1, 2, 4, 8 in the serving engine after each full benchmark; long): "
                    + ("on" if self.app.measure_load else "off"), timeout=4)

    def action_toggle_remeasure(self) -> None:
        self.app.remeasure = not self.app.remeasure
        self.notify("Stored results with the same artifact, engine and settings: " +
                    ("measured again" if self.app.remeasure else "shown again, marked reused"), timeout=4)

    def action_options(self) -> None:
        from qexplorer.ui.screens.options import RunOptionsScreen

        def saved(options) -> None:
            if options is not None:
                self.app.run_extras = options

        from dataclasses import replace

        # the dialog edits the extras; quick / depth / quality / re-measure stay the screen's own toggles
        self.app.push_screen(RunOptionsScreen(replace(self.app.run_options(), bench=self.app.run_extras.bench)),
                             saved)

    def action_kv_dtype(self) -> None:
        names = list(KV_DTYPE_BYTES)
        self.app.kv_dtype = names[(names.index(self.app.kv_dtype) + 1) % len(names)]


def _options_line(options) -> str:
    """The options that differ from `qexplorer run`'s defaults, so that what will run is on screen."""
    from qexplorer.core.session import RunOptions

    default = RunOptions()
    parts = []
    if options.corpus:
        parts.append(f"corpus {options.corpus}")
    if options.reference != default.reference:
        parts.append(f"reference {options.reference}")
    if (options.quality_tokens, options.quality_ctx) != (default.quality_tokens, default.quality_ctx):
        parts.append(f"quality {options.quality_tokens} tokens in {options.quality_ctx}-token chunks")
    if options.bench.threads:
        parts.append(f"{options.bench.threads} threads")
    if options.engine_args:
        parts.append("engine args " + " ".join(options.engine_args))
    if options.order != default.order:
        parts.append(str(options.order))
    if options.force:
        parts.append("force")
    if options.tasks:
        parts.append("tasks " + ",".join(options.tasks) + (f" (at most {options.tasks_limit} items each)"
                                                           if options.tasks_limit is not None else ""))
        if options.allow_unisolated_exec:
            parts.append("model-written code may run without network isolation")
    if options.load is not None:
        parts.append(f"load sweep at concurrency {','.join(map(str, options.load.levels))} "
                     f"({options.load.prompt_tokens}-token prompts, {options.load.max_tokens} out; "
                     f"objective {options.load.plan.objective.describe()})")
    return ("\noptions: " + ", ".join(parts)) if parts else ""


def _vllm_line(vllm: VllmServePlan) -> str:
    """How vLLM will be started for the highlighted precision (planned in core; shown here)."""
    start = (f"would not start: {vllm.start_refusal}" if vllm.start_refusal else
             f"--gpu-memory-utilization {vllm.utilization:.2f} (passes its start-up check)"
             if vllm.utilization is not None else "")
    return f"\nvLLM expected kernel: {vllm.expected_kernel}; {vllm.graphs}; --dtype {vllm.dtype}" + (
        f"; {start}" if start else "")


def _capacity_line(capacity: Capacity) -> str:
    """What the capacity column rests on for the highlighted precision (computed in core)."""
    if capacity.sequences is None or capacity.limit:
        return f"\ncapacity: {capacity.limit}"
    return (f"\ncapacity: {capacity.sequences:,} × {capacity.context:,} tokens, "
            f"{format_bytes(capacity.kv_bytes_per_sequence)} {capacity.kv_dtype} KV each, in the "
            f"{format_bytes(capacity.kv_budget_bytes)} left; {capacity.rule}")


def _projection_line(estimate) -> str:
    """A projected job estimate's phases, each with what it rests on (the plan's words, not a measurement)."""
    if estimate is None or not any(p.basis for p in estimate.phases):
        return ""
    return "\nprojected job: " + "; ".join(f"{p.name} {format_duration(p.seconds)}" + (f" ({p.basis})" if p.basis
                                                                                          else "")
                                             for p in estimate.phases)
