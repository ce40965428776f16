"""The task pass as a phase of a job: its choices, the refusal without isolation, the record, the ETA, the paired
comparisons across precisions, and (e2e) the CLI on the bundled model."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from test_job_queue import a_record

from qexplorer.cli import main
from qexplorer.core.catalog import Catalog
from qexplorer.core.domain.bench import BenchConfig
from qexplorer.core.domain.events import Cancelled, Log, Phase, Progress, checked, drive
from qexplorer.core.domain.phases import PhaseKind
from qexplorer.core.domain.record import LengthAccuracy, RunRecord, TaskScore
from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.errors import UserError
from qexplorer.core.eta import estimate_jobs
from qexplorer.core.jobs.clock import timings_from
from qexplorer.core.precisions import get
from qexplorer.core.results import ResultsStore, flat_row, to_markdown
from qexplorer.core.reuse import reuse_key
from qexplorer.core.session import RunOptions, plan_run
from qexplorer.core.tasks import humaneval, sandbox, stats
from qexplorer.core.tasks.run import (
    ARITH_MAX_NEW_TOKENS,
    HUMANEVAL_MAX_NEW_TOKENS,
    Answer,
    Prompt,
    TaskEngine,
    arith_items,
    parse_tasks,
    task_pass,
    task_pass_kept,
    token_budget,
)
from qexplorer.core.tasks.summary import summarize


def job(**changes) -> JobSpec:
    return JobSpec(model_ref="default", precision="q8_0", data_dir="/d", bench=BenchConfig.quick(), **changes)


def test_task_choices_are_checked_in_one_sentence():
    assert [(c.name, c.max_length) for c in parse_tasks(["humaneval", "arith:3", "arith"])] == [("humaneval", 8),
                                                                                              ("arith", 3)]
    for bad, words in (("mmlu", "Unknown task 'mmlu'"), ("arith:0", "at least 1"), ("humaneval:3", "Unknown task")):
        with pytest.raises(UserError, match=words):
            parse_tasks([bad])


def right_answers(chat: bool) -> TaskEngine:
    """An engine that answers every arithmetic item right (the chain's value, worked out from the prompt)."""
    items = {item.prompt: item for item in arith_items(parse_tasks(["arith:2"])[0], 4)}

    def generate(prompts: Sequence[Prompt]) -> Iterator[Answer]:
        for prompt in prompts:
            assert prompt.chat is chat and prompt.max_new_tokens == ARITH_MAX_NEW_TOKENS
            question = prompt.text.removesuffix("\nAnswer:")
            yield Answer(f"The answer is {items[question].answer}." if chat else f" {items[question].answer}\nMore",
                         3)

    return TaskEngine(chat, generate)


@pytest.mark.parametrize("chat", [True, False])
def test_an_arith_pass_keeps_every_outcome_in_order_and_per_length(chat: bool):
    events = []
    scores = drive(task_pass(job(tasks=("arith:2",), tasks_limit=4), "llama.cpp", lambda: right_answers(chat)),
                   events.append)
    (score,) = scores
    assert (score.name, score.n, score.passed, score.template) == ("arith", 4, 4, "chat" if chat else "completion")
    assert score.outcomes == (True,) * 4 and score.per_length == (LengthAccuracy(1, 2, 2), LengthAccuracy(2, 2, 2))
    assert score.generated_tokens == 12 and score.max_new_tokens == ARITH_MAX_NEW_TOKENS
    assert events[0] == Phase(PhaseKind.TASKS, events[0].message) and "arith:2" in events[0].message
    assert [e.done for e in events if isinstance(e, Progress)] == [1, 2, 3, 4]


def test_humaneval_is_refused_before_anything_is_generated_without_isolation(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation", lambda: sandbox.NO_ISOLATION)
    started = []
    with pytest.raises(UserError, match="without network isolation; pass --allow-unisolated-exec"):
        drive(task_pass(job(tasks=("humaneval",)), "llama.cpp", lambda: started.append(1)))
    assert started == []  # not even the engine's context was made


def test_the_cli_refuses_humaneval_without_isolation_before_any_job(monkeypatch, capsys):
    monkeypatch.setattr(sandbox, "isolation", lambda: sandbox.NO_ISOLATION)
    assert main(["run", "default", "--precision", "q8_0", "--tasks", "humaneval,arith", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "without network isolation; pass --allow-unisolated-exec" in err and err.count("\n") == 1
    assert main(["run", "default", "--precision", "q8_0", "--tasks", "mmlu"]) == 2
    assert "Unknown task 'mmlu'" in capsys.readouterr().err


def test_humaneval_scores_the_reference_solutions_when_unisolated_exec_is_allowed(monkeypatch):
    """The dataset's own solutions are trusted code: with the user's permission they run without isolation, and
    a base model's continuation is cut at the stop sequences before it is scored."""
    monkeypatch.setattr(sandbox, "isolation", lambda: sandbox.NO_ISOLATION)
    problems = humaneval.load_problems()[:3]

    def generate(prompts: Sequence[Prompt]) -> Iterator[Answer]:
        for index, (prompt, problem) in enumerate(zip(prompts, problems, strict=False)):
            assert prompt.text == problem.prompt and prompt.max_new_tokens == HUMANEVAL_MAX_NEW_TOKENS
            yield Answer(problem.canonical_solution + "\ndef extra():\n    pass" if index < 2 else "    return None",
                         10)

    (score,) = drive(task_pass(job(tasks=("humaneval",), tasks_limit=3, allow_unisolated_exec=True), "vllm",
                               lambda: TaskEngine(False, generate)))
    assert (score.n, score.outcomes, score.template, score.sandbox) == (3, (True, True, False), "completion", "none")


def score(name: str, outcomes: tuple[bool, ...], items: str = "same") -> TaskScore:
    return TaskScore(name=name, engine="llama.cpp", template="chat", n=len(outcomes), passed=sum(outcomes),
                     outcomes=outcomes, items_sha256=items, max_new_tokens=32)


def test_accuracy_recovery_and_paired_tests_come_from_the_stored_outcomes():
    reference = (True,) * 30 + (False,) * 10
    close = (True,) * 29 + (False,) * 11  # one item lost: no significant difference
    far = (False,) * 40
    records = [replace(a_record("q4_k_m"), tasks=(score("arith", far),)),
               replace(a_record("bf16"), tasks=(score("arith", reference),)),
               replace(a_record("q8_0"), tasks=(score("arith", close),)),
               replace(a_record("q2_k"), tasks=(score("arith", far, items="other"),))]
    rows = {r.precision: r for r in summarize(records, "bf16")}
    assert list(rows) == ["bf16", "q8_0", "q4_k_m", "q2_k"]  # the registry's order, widest first
    bf16, q8, q4, q2 = rows["bf16"], rows["q8_0"], rows["q4_k_m"], rows["q2_k"]
    interval = stats.wilson(29, 40)
    assert (q8.accuracy, q8.low, q8.high) == (29 / 40, interval.low, interval.high)
    assert bf16.recovery == 1.0 and q8.recovery == pytest.approx(29 / 30) and bf16.versus_reference is None
    vs = q8.versus_reference
    assert (vs.against, vs.b, vs.c, vs.n) == ("bf16", 1, 0, 40) and vs.p_value == 1.0 and not vs.significant
    assert vs.verdict == "no significant difference at 40 items"
    assert vs.detectable_difference == stats.detectable_difference(40, 1 / 40)
    assert q8.versus_previous == vs  # bf16 is its neighbour too
    assert q4.versus_reference.significant and q4.versus_reference.b == 30
    assert q4.versus_previous.against == "q8_0" and q4.versus_previous.b == 29
    assert "p = " in q4.versus_reference.verdict and q4.recovery == 0.0
    # other items: shown with its interval, never paired
    assert q2.versus_reference is None and q2.versus_previous is None and q2.recovery is None


def test_a_record_with_tasks_round_trips_and_ranks_beside_one_without():
    plain = a_record("q8_0")
    with_tasks = replace(plain, tasks=(replace(score("arith", (True, False)),
                                               per_length=(LengthAccuracy(1, 2, 1),)),))
    again = RunRecord.from_json(json.loads(with_tasks.dumps()))
    assert again == with_tasks and again.tasks[0].outcomes == (True, False)
    assert RunRecord.from_json(json.loads(plain.dumps())).tasks == ()  # a record from before reads as none
    # tasks do not change the speed or KLD settings: the two rank together; task scores pair by their items
    assert with_tasks.settings_key() == plain.settings_key()


def test_a_failed_task_pass_loses_only_its_scores_and_a_cancel_still_stops(monkeypatch):
    def broken(prompts: Sequence[Prompt]) -> Iterator[Answer]:
        raise RuntimeError("the server went away")
        yield  # a generator

    events = []
    scores, error = drive(task_pass_kept(job(tasks=("arith:2",), tasks_limit=4), "vllm",
                                         lambda: TaskEngine(True, broken)), events.append)
    assert scores == () and error == "RuntimeError: the server went away"
    assert any(isinstance(e, Log) and e.level == "warning" and "the benchmark is kept" in e.message for e in events)
    calls = []

    def second_fails(prompts: Sequence[Prompt]) -> Iterator[Answer]:
        calls.append(len(prompts))
        if len(calls) == 2:
            raise RuntimeError("the server went away")
        yield from right_answers(True).generate(prompts)

    monkeypatch.setattr(sandbox, "isolation", lambda: sandbox.NO_ISOLATION)
    scores, error = drive(task_pass_kept(job(tasks=("arith:2", "humaneval"), tasks_limit=4,
                                             allow_unisolated_exec=True), "vllm",
                                         lambda: TaskEngine(True, second_fails)), lambda _e: None)
    assert [s.name for s in scores] == ["arith"] and error  # HumanEval failed: the arithmetic score is kept
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        drive(checked(task_pass_kept(job(tasks=("arith:2",), tasks_limit=4), "vllm", lambda: right_answers(True),
                                     cancel), cancel), lambda _e: None)


def test_the_reuse_key_follows_the_task_pass_and_is_unchanged_without_one():
    def key(spec: JobSpec) -> str:
        return reuse_key(spec, "a" * 64, {"qexplorer": "0.1.0"}, None, "AMD EPYC", None)

    plain = job()
    keys = {key(plain), key(job(tasks=("arith",))), key(job(tasks=("arith:2",))),
            key(job(tasks=("arith",), tasks_limit=4))}
    assert len(keys) == 4
    assert key(job(allow_unisolated_exec=True)) == key(plain)


def test_the_task_pass_is_a_phase_of_the_full_job_only_and_the_eta_counts_it(tmp_path: Path):
    model = Catalog().resolve("default")
    options = RunOptions(bench=BenchConfig(), tasks=("humaneval", "arith:2"), tasks_limit=4)
    plan = plan_run("default", model, [get("q8_0")], options, None, tmp_path)
    quick, full = plan.specs
    assert quick.first_pass and quick.tasks == () and full.tasks == ("humaneval", "arith:2")
    names = [[p.name for p in e.phases] for e in plan.estimates]
    assert "tasks" not in names[0]
    assert names[1][names[1].index("benchmark") + 1] == "tasks"
    assert token_budget(full) == 4 * HUMANEVAL_MAX_NEW_TOKENS + 4 * ARITH_MAX_NEW_TOKENS
    (without,) = estimate_jobs(model, [replace(full, tasks=())], tmp_path, vllm_found=False)
    (with_tasks,) = estimate_jobs(model, [full], tmp_path, vllm_found=False)
    tasks_phase = next(p for p in with_tasks.phases if p.name == "tasks")
    assert tasks_phase.units > 0 and with_tasks.total_s == pytest.approx(without.total_s + tasks_phase.seconds)
    assert timings_from([("benchmark", 2.0), ("tasks", 30.0)]).tasks_s == 30.0
    assert timings_from([("benchmark", 2.0)]).tasks_s is None


@pytest.mark.e2e
def test_cli_run_with_tasks_on_the_bundled_model(capsys, isolated_user_dirs):
    """llama.cpp in-process: HumanEval (4 problems, scored in the sandbox) and arith:2 (4 items) after the
    benchmark. The 135 M model scores near 0 on HumanEval: only the shapes and ranges are asserted."""
    allow = [] if sandbox.isolation().network_isolated else ["--allow-unisolated-exec"]
    code = main(["run", "default", "--precision", "q8_0", "--tasks", "humaneval,arith:2", "--tasks-limit", "4",
                 "--quick", "--no-quick-pass", "--json", *allow])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    (job_entry,) = data["jobs"]
    result = job_entry["result"]
    assert [t["name"] for t in result["tasks"]] == ["humaneval", "arith"]
    for task in result["tasks"]:
        assert task["n"] == 4 and len(task["outcomes"]) == 4 and 0 <= task["passed"] <= 4
        assert task["engine"] == "llama.cpp" and task["template"] in ("chat", "completion")
    assert result["tasks"][1]["per_length"] == [{"length": 1, "n": 2, "passed": result["tasks"][1]["per_length"][0]
                                                 ["passed"]}, {"length": 2, "n": 2,
                                                               "passed": result["tasks"][1]["per_length"][1]["passed"]}]
    assert result["timings"]["tasks_s"] > 0
    assert "tasks" in [p[0] for p in job_entry["estimate"]["phases"]]
    rows = data["task_accuracy"]
    assert [(r["precision"], r["task"]) for r in rows] == [("q8_0", "humaneval"), ("q8_0", "arith")]
    for row in rows:
        assert 0 <= row["low"] <= row["accuracy"] <= row["high"] <= 1
        assert row["recovery"] is None and row["versus_reference"] is None  # no bf16 measured in this run


def test_the_exports_carry_each_task_with_its_interval(tmp_path: Path):
    store = ResultsStore.in_dir(tmp_path)
    store.add(replace(a_record("q8_0"), tasks=(score("arith", (True, False, True, True)),)))
    (stored,) = store.all()
    (fields,) = json.loads(flat_row(stored)["task_scores"])
    interval = stats.wilson(3, 4)
    assert fields == {"task": "arith", "engine": "llama.cpp", "template": "chat", "n": 4, "passed": 3,
                      "accuracy": 0.75, "wilson_low": interval.low, "wilson_high": interval.high, "per_length": None}
    assert (f"arith 3/4 = 75.0 % (95 % CI {100 * interval.low:.1f}-{100 * interval.high:.1f} %, chat)"
            in to_markdown([stored]))
    assert flat_row(replace(stored, record=a_record("q8_0")))["task_scores"] is None


def test_the_plan_holds_the_task_pass_context_and_vllms_batch():
    """A job with the task pass is planned with the memory its pass takes: vLLM started for 8 sequences of 2048
    tokens (its KV cache as the launch rounds it), llama.cpp a 2048-token context of its own."""
    from qexplorer.core.planner import kv_bytes_per_token, plan_job_peak
    from qexplorer.core.serving.vllm_launch import kv_cache_bytes
    from qexplorer.core.tasks.run import TASK_CONCURRENCY, TASK_CONTEXT_TOKENS

    spec = Catalog().resolve("default")
    bench = BenchConfig.quick()
    kv = kv_bytes_per_token(spec, "bf16")
    for key in ("bf16", "q8_0"):
        plain = plan_job_peak(spec, get(key), bench, on_gpu=False)
        with_tasks = plan_job_peak(spec, get(key), bench, on_gpu=False, tasks=True)
        if key == "bf16":
            expected = (kv_cache_bytes(kv, TASK_CONTEXT_TOKENS, TASK_CONCURRENCY, "cpu")
                        - kv_cache_bytes(kv, bench.context_tokens + 16, 1, "cpu"))
        else:
            expected = kv_bytes_per_token(spec, "f16") * (TASK_CONTEXT_TOKENS - bench.context_tokens)
        assert with_tasks - plain == expected


def test_the_transformers_fallback_generates_the_task_pass_through_the_chat_template():
    """The fallback's generate() (engines.transformers._generate) on a random-weight model with the bundled
    model's own tokenizer and chat template: every item answered, within its token budget, greedy (twice the
    same)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qexplorer.core.catalog import bundled_model_path
    from qexplorer.core.engines.transformers import _generate

    path = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    torch.manual_seed(24)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    assert tokenizer.chat_template

    def run() -> TaskScore:
        (result,) = drive(task_pass(job(tasks=("arith:2",), tasks_limit=2), "transformers",
                                    lambda: TaskEngine(True, _generate(model, tokenizer))), lambda _e: None)
        return result

    first = run()
    assert (first.n, first.template, first.engine) == (2, "chat", "transformers")
    assert 0 < first.generated_tokens <= 2 * ARITH_MAX_NEW_TOKENS
    assert run() == first  # greedy: the same answers again
