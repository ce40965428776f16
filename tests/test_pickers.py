"""Model and precision pickers: snapshots and keyboard behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest
from apps import feed_samples, settle, sim_app
from models import LLAMA_31_8B, QWEN3_CODER_30B_A3B, write_config

from qexplorer.core.session import RunOrder
from qexplorer.ui.screens.models import ModelPickerScreen
from qexplorer.ui.screens.plan import PlanScreen

SIZES = [(80, 24), (120, 40)]


@pytest.fixture
def fixture_models(tmp_path: Path) -> tuple[str, ...]:
    return (str(write_config(tmp_path / "models" / "Qwen3-Coder-30B-A3B", QWEN3_CODER_30B_A3B)),
            str(write_config(tmp_path / "models" / "Llama-3.1-8B", LLAMA_31_8B)))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("profile", ["none", "gb10"])
def test_model_picker_snapshot(snap_compare, profile, size, fixture_models):
    app = sim_app(profile, models=fixture_models)

    async def run_before(pilot):
        await feed_samples(app, pilot, 2)
        await settle(app, pilot)
        await pilot.press("m")
        await settle(app, pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("profile", ["none", "gb10"])
def test_precision_picker_snapshot(snap_compare, profile, size):
    app = sim_app(profile)

    async def run_before(pilot):
        await feed_samples(app, pilot, 2)
        await settle(app, pilot)
        await pilot.press("p")
        await settle(app, pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


def test_precision_picker_big_model_on_gb10_snapshot(snap_compare, fixture_models):
    """Qwen3-Coder-30B at 32K context on a busy GB10: BF16 does not fit, AWQ does."""
    app = sim_app("gb10", models=fixture_models, default_context=32768)
    app.sources.sampler.host.machine.extra_used_bytes = 30 * 1024**3

    async def run_before(pilot):
        await feed_samples(app, pilot, 2)
        await settle(app, pilot)
        await pilot.press("m")
        await pilot.press(*"qwen3", "enter")
        await settle(app, pilot)

    assert snap_compare(app, terminal_size=(120, 40), run_before=run_before)


async def test_filter_as_you_type_and_pick(fixture_models):
    app = sim_app("none", models=fixture_models)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        assert app.model is not None and app.model.name.startswith("SmolLM2")  # starts on the bundled model
        await pilot.press("m")
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, ModelPickerScreen)
        assert screen.query_one("#model-table").row_count == 3
        await pilot.press(*"llama 3.1")
        assert screen.query_one("#model-table").row_count == 1
        await pilot.press("enter")
        await pilot.pause()
        assert app.model.name == "Llama-3.1-8B"
        assert isinstance(app.screen, PlanScreen)


async def test_precision_picker_keys():
    app = sim_app("gb10")
    async with app.run_test(size=(100, 30)) as pilot:
        await feed_samples(app, pilot, 1)
        await settle(app, pilot)
        await pilot.press("p")
        await pilot.pause()
        table = app.screen.query_one("#plan-table")
        assert table.row_count == 16  # 10 Hugging Face precisions (NVFP4A16 and NVFP4 included) + 6 GGUF
        assert app.context == 4096
        await pilot.press("right_square_bracket")
        assert app.context == 8192
        await pilot.press("left_square_bracket", "left_square_bracket")
        assert app.context == 2048
        await pilot.press("k")
        assert app.kv_dtype == "bf16"
        before = set(app.chosen)
        await pilot.press("space")  # first row: fp32
        assert set(app.chosen) ^ before == {"fp32"}
        # D cycles the depths within the planned context (2048 - pp512 - tg128 = 1408 tokens of room)
        await pilot.press("D")
        assert app.bench_depths == (0, 704) and app.bench_config().depths == (0, 704)
        await pilot.pause()
        assert "pp512 / tg128 × 5 at depth 0, 704" in str(app.screen.query_one("#plan-summary").render())
        await pilot.press("D", "D")
        assert app.bench_depths == (0,)
        await pilot.press("escape")
        assert not isinstance(app.screen, PlanScreen)


async def test_plan_screen_shows_capacity_at_the_chosen_context():
    """Issue 25: a column of sequences per precision, headed with the context, the figures core computed."""
    from qexplorer.core.planner import PlanRequest, plan_model

    app = sim_app("gb10")
    async with app.run_test(size=(120, 40)) as pilot:
        await feed_samples(app, pilot, 1)
        await settle(app, pilot)
        await pilot.press("p")
        await pilot.pause()
        table = app.screen.query_one("#plan-table")
        labels = [str(c.label) for c in table.columns.values()]
        assert labels[6] == "seqs @ 4,096"
        plans = plan_model(app.model, PlanRequest(context=4096, kv_dtype=app.kv_dtype), app.snapshot)
        assert [table.get_row_at(i)[6] for i in range(table.row_count)] == [
            f"{p.capacity.sequences:,} seq" for p in plans]
        assert "capacity: " in str(app.screen.query_one("#plan-detail").render())
        await pilot.press("right_square_bracket")
        await pilot.pause()
        assert str(list(table.columns.values())[6].label) == "seqs @ 8,192"


async def test_unreadable_model_is_listed_with_its_error(tmp_path: Path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 16)
    app = sim_app("none", models=(str(broken),))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        entry = next(e for e in app.catalog_entries if e.ref == str(broken))
        assert entry.spec is None and "implausible counts" in entry.error
        await pilot.press("m")
        await settle(app, pilot)
        await pilot.press(*"broken", "enter")
        await pilot.pause()
        assert app.model.name.startswith("SmolLM2")  # nothing lost, still on the previous model
        assert any("implausible" in n.message for n in app._notifications)


async def test_the_app_sets_every_run_option_the_cli_has(tmp_path: Path):
    """One run plan for both front ends (core.session): corpus and reference set in the plan screen's options
    dialog reach every planned job, as `qexplorer run --corpus … --reference fp32` does."""
    corpus = tmp_path / "eval.txt"
    corpus.write_text("A short evaluation text. " * 200, encoding="utf-8")
    app = sim_app("none")
    async with app.run_test(size=(120, 40)) as pilot:
        await feed_samples(app, pilot, 1)
        await settle(app, pilot)
        await pilot.press("p")
        await pilot.pause()
        await pilot.press("o")
        await pilot.pause()
        dialog = app.screen
        dialog.query_one("#opt-corpus").value = str(corpus)
        dialog.query_one("#opt-reference").value = "fp32"
        dialog.query_one("#opt-tokens").value = "1024"
        dialog.query_one("#opt-engine").value = "--max-num-seqs 4"
        dialog.query_one("#opt-order").value = RunOrder.ONE_AT_A_TIME
        dialog.query_one("#opt-tasks-limit").value = "20"
        dialog.query_one("#opt-unisolated").value = True
        await pilot.click("#opt-save")
        await pilot.pause()
        assert isinstance(app.screen, PlanScreen)
        options = app.run_options()
        assert (options.corpus, options.reference, options.quality_tokens) == (str(corpus), "fp32", 1024)
        assert options.engine_args == ("--max-num-seqs", "4") and not options.overlap
        assert options.tasks_limit == 20 and options.allow_unisolated_exec
        plan = app.planned_jobs()
        assert plan.specs and all(s.quality_corpus == str(corpus) and s.reference_precision == "fp32"
                                  and s.quality_tokens == 1024 for s in plan.specs)
        assert "corpus " + str(corpus) in str(app.screen.query_one("#plan-summary").render())
        # a bad value is one sentence, and nothing is saved
        await pilot.press("o")
        await pilot.pause()
        app.screen.query_one("#opt-corpus").value = str(tmp_path / "missing.txt")
        await pilot.click("#opt-save")
        await pilot.pause()
        assert app.run_options().corpus == str(corpus)
        assert any("does not exist" in n.message for n in app._notifications)


async def test_t_on_the_plan_screen_toggles_the_task_pass_for_the_full_jobs():
    app = sim_app("none")
    async with app.run_test(size=(120, 40)) as pilot:
        await feed_samples(app, pilot, 1)
        await settle(app, pilot)
        await pilot.press("p")
        await pilot.pause()
        assert app.run_options().tasks == ()
        await pilot.press("t")
        await pilot.pause()
        assert app.run_options().tasks == ("humaneval", "arith")
        plan = app.planned_jobs()
        assert all(s.tasks == (() if s.first_pass else ("humaneval", "arith")) for s in plan.specs)
        assert "tasks humaneval,arith" in str(app.screen.query_one("#plan-summary").render())
        await pilot.press("t")
        await pilot.pause()
        assert app.run_options().tasks == ()
