"""Quality figures with their spread and task accuracy on the compare screen: paired KLD standard errors, the
reference's own row, the task veto in the recommendation, the verdict sentences, exports and a snapshot."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from apps import feed_samples, settle, sim_app
from test_job_queue import a_record

from qexplorer.core.catalog import bundled_model_path
from qexplorer.core.compare import (
    CompareRow,
    kld_tied,
    paired_kld_se,
    recommend,
    row_from_result,
    rows_from_results,
)
from qexplorer.core.domain.record import LengthAccuracy, QualityStats, ReferenceInfo, RunRecord, TaskScore
from qexplorer.core.kinds import Engine, Family, SupportMode
from qexplorer.core.precisions import Hardware
from qexplorer.core.quality import encode_positions
from qexplorer.core.results import ResultsStore, to_csv, to_json, to_markdown
from qexplorer.core.tasks.summary import summarize, verdicts

CPU = Hardware(cuda=False)
REFERENCE = ReferenceInfo("bf16", True, "prose", "abc", 4096, 512, 8, 256, "8 × 512")


def quality(positions: list[float], top1: float = 95.0, reference: ReferenceInfo = REFERENCE) -> QualityStats:
    kld = np.asarray(positions, dtype=np.float64)
    n = len(kld)
    return QualityStats(
        n_positions=n, ppl=15.0, ppl_ref=14.6, ln_ppl_ratio=0.02, ln_ppl_ratio_se=0.002, kld_mean=float(kld.mean()),
        kld_sd=float(kld.std(ddof=1)), kld_se=float(kld.std(ddof=1) / math.sqrt(n)), kld_median=0.0, kld_p90=0.0,
        kld_p95=0.0, kld_p99=0.0, kld_p999=0.0, kld_max=float(kld.max()), same_top1_pct=top1,
        same_top1_se_pct=0.4, delta_p_mean_pct=0.0, delta_p_rms_pct=1.0, reference=reference, ppl_se=0.3,
        kld_positions=encode_positions(kld))


def test_paired_kld_se_is_the_spread_of_the_per_position_differences():
    a = quality([0.1, 0.2, 0.3, 0.4])
    b = quality([0.1, 0.25, 0.25, 0.5])
    # differences 0, -0.05, 0.05, -0.1: mean -0.025, sample sd √(0.0125 / 3) = 0.0645497, SE = sd / 2
    assert paired_kld_se(a, b) == pytest.approx(0.0322749, abs=1e-6)
    other_reference = quality([0.1, 0.25, 0.25, 0.5], reference=replace(REFERENCE, corpus_sha256="other"))
    assert paired_kld_se(a, other_reference) is None  # not the same positions: no pairing
    assert paired_kld_se(a, replace(b, kld_positions="")) is None  # an older row: no per-position figures


def test_klds_measured_on_the_same_positions_tie_by_their_paired_error():
    """Two KLDs 0.01 apart whose independent SEs (0.01 each) would call them tied: measured on the same positions,
    with one always 0.01 above the other bar a little noise, the paired SE is tiny and they are told apart."""
    rng = np.random.default_rng(25)
    base = rng.exponential(0.05, 2000)
    higher = base + 0.01 + rng.normal(0.0, 0.001, 2000)
    qa, qb = quality(list(base)), quality(list(higher))
    paired = paired_kld_se(qb, qa)
    assert paired is not None and paired < 0.0001
    a = CompareRow(precision="q8_0", label="Q8_0", family=Family.GGUF, mode=SupportMode.NATIVE, weight_bytes=1,
                   peak_bytes=None, plan_bytes=None, prefill_tok_s=None, prefill_sd=None, decode_tok_s=1.0,
                   decode_sd=0.0, ttft_s=None, roofline_pct=None, kld=0.05, top1_pct=None, ppl=None, ppl_ref=None,
                   reference_quantized=False, kld_se=0.01)
    b = replace(a, precision="q6_k", label="Q6_K", kld=0.06, kld_se=0.01)
    assert kld_tied(a, b)  # independent: 0.01 < 2 × √(0.01² + 0.01²)
    assert not kld_tied(replace(a, kld_paired_se=(("q6_k", paired),)), b)


def task(name: str, outcomes: tuple[bool, ...], per_length: tuple[LengthAccuracy, ...] = ()) -> TaskScore:
    return TaskScore(name=name, engine="llama.cpp", template="chat", n=len(outcomes), passed=sum(outcomes),
                     outcomes=outcomes, items_sha256="items", max_new_tokens=32, per_length=per_length)


HUMANEVAL_BF16 = (True,) * 20 + (False,) * 144
HUMANEVAL_Q8 = (True,) * 19 + (False,) * 145  # one lost: no significant difference
HUMANEVAL_Q4 = (False,) * 10 + (True,) * 10 + (False,) * 144  # ten lost, none gained: p = 2/1024


def chains(per_length: list[int]) -> TaskScore:
    """arith with 10 items per length; ``per_length`` right of each."""
    outcomes = tuple(i < right for right in per_length for i in range(10))
    return task("arith", outcomes, tuple(LengthAccuracy(k + 1, 10, right) for k, right in enumerate(per_length)))


def record(precision: str, family: Family, kld_positions: list[float], humaneval: tuple[bool, ...],
           arith: list[int], created: int) -> RunRecord:
    base = a_record(precision, decode=100.0 + created)
    engine = replace(base.engine, name=Engine.LLAMA_CPP if family == Family.GGUF else Engine.VLLM)
    return replace(base, family=family, engine=engine, quality=quality(kld_positions),
                   tasks=(task("humaneval", humaneval), chains(arith)))


def store_task_results(data_dir: Path) -> ResultsStore:
    store = ResultsStore.in_dir(data_dir)
    path = str(bundled_model_path())
    rng = np.random.default_rng(24)
    base = list(rng.exponential(0.02, 512))
    rows = [("bf16", Family.TORCH, [0.0] * 512, HUMANEVAL_BF16, [10, 9, 9, 8, 8, 7, 6, 6], 1),
            ("q8_0", Family.GGUF, [x * 0.2 for x in base], HUMANEVAL_Q8, [10, 9, 9, 8, 8, 7, 6, 5], 2),
            ("q4_k_m", Family.GGUF, base, HUMANEVAL_Q4, [10, 9, 8, 6, 5, 3, 2, 1], 3)]
    for precision, family, positions, humaneval, arith, created in rows:
        r = record(precision, family, positions, humaneval, arith, created)
        r = replace(r, model=replace(r.model, path=path, name="SmolLM2-135M-Instruct (Q4_1)"))
        if precision == "bf16":  # the reference's own row: its quality row is the reference pass
            r = replace(r, quality=replace(r.quality, kld_mean=0.0, kld_se=0.0, same_top1_pct=100.0,
                                           same_top1_se_pct=0.0))
        store.add(r)
    return store


def test_rows_carry_tasks_paired_errors_and_the_reference_role(tmp_path: Path):
    store = store_task_results(tmp_path)
    rows = {r.precision: r for r in rows_from_results(store.comparable(str(bundled_model_path())))}
    assert rows["bf16"].is_reference and not rows["q8_0"].is_reference
    assert dict(rows["q8_0"].kld_paired_se).keys() == {"bf16", "q4_k_m"}
    q4 = rows["q4_k_m"].task("humaneval")
    assert q4 is not None and q4.versus_reference is not None
    assert (q4.versus_reference.b, q4.versus_reference.c) == (10, 0)
    assert q4.versus_reference.p_value == pytest.approx(2 / 1024) and q4.recovery == pytest.approx(0.5)
    assert rows["q4_k_m"].task_loss() is q4 and rows["q8_0"].task_loss() is None
    arith = rows["q4_k_m"].task("arith")
    assert arith is not None and arith.length_accuracy[:2] == ((1, 1.0), (2, 0.9))


def test_the_task_veto_overrules_the_lowest_kld_and_says_so(tmp_path: Path):
    store = store_task_results(tmp_path)
    rows = list(rows_from_results(store.comparable(str(bundled_model_path()))))
    # make Q4_K_M the lowest KLD of the quantized ones by far: KLD alone would pick it
    rows = [replace(r, kld=0.0001, kld_paired_se=()) if r.precision == "q4_k_m" else r for r in rows]
    rows = [r for r in rows if r.precision != "bf16"]
    result = recommend(rows, CPU, None, "quality")
    assert result.precision == "q8_0"
    assert "The task veto decided: GGUF Q4_K_M has the lowest KLD" in result.text
    assert "HumanEval pass@1 fell 6.1% below BF16's on the same 164 items (exact McNemar p = 0.00195)" in result.text
    without_tasks = recommend([replace(r, tasks=()) for r in rows], CPU, None, "quality")
    assert without_tasks.precision == "q4_k_m" and "task veto" not in without_tasks.text
    speed = recommend(rows, CPU, None, "speed")  # the veto is for quality first only
    assert "task veto" not in speed.text


def test_verdicts_say_when_a_task_cannot_tell_precisions_apart():
    def rec(precision: str, outcomes: tuple[bool, ...]) -> RunRecord:
        return replace(a_record(precision), tasks=(task("humaneval", outcomes),))

    weak = summarize([rec("bf16", (True, True) + (False,) * 162), rec("q8_0", (True,) + (False,) * 163)])
    (verdict,) = verdicts(weak)
    assert not verdict.tells_apart and "too weak for this task to tell these precisions apart" in verdict.text
    assert "the best scores 1.2%" in verdict.text
    strong = summarize([rec("bf16", HUMANEVAL_BF16), rec("q4_k_m", HUMANEVAL_Q4)])
    (verdict,) = verdicts(strong)
    assert verdict.tells_apart and "Q4_K_M -6.1% against BF16 (p = 0.00195)" in verdict.text
    close = summarize([rec("bf16", HUMANEVAL_BF16), rec("q8_0", HUMANEVAL_Q8)])
    (verdict,) = verdicts(close)
    assert not verdict.tells_apart and "no significant difference at 164 items" in verdict.text


def test_exports_carry_standard_errors_the_kld_name_the_reference_and_the_tests(tmp_path: Path):
    store = store_task_results(tmp_path)
    results = store.latest_per_key(str(bundled_model_path()))
    md = to_markdown(results)
    assert "reference (KLD (top-256, lower bound) 0 and top-1 100 % by definition)" in md
    assert "KLD (top-256, lower bound) 0.0040 ± 0.0002 SE" in md  # Q8_0: 0.2 × the exponential's mean
    assert "HumanEval pass@1, GGUF Q4_K_M: 10/164 = 6.1 % [3.3, 10.9], recovery 0.50" in md
    assert "HumanEval pass@1 tells precisions apart at 164 items" in md
    data = json.loads(to_json(results))
    by = {r["precision"]: r for r in data["results"]}
    assert by["bf16"]["quality_reference"] == "reference" and by["q8_0"]["quality_reference"] == "measured"
    assert by["q8_0"]["kld_name"] == "KLD (top-256, lower bound)" and by["q8_0"]["kld_se"] > 0
    assert by["q8_0"]["same_top1_se_pct"] == 0.4 and by["q8_0"]["ppl_se"] == 0.3
    tests = {t["task"]: t for t in json.loads(by["q4_k_m"]["task_tests"])}
    assert tests["humaneval"]["vs_reference_p_value"] == pytest.approx(2 / 1024)
    assert [v["tells_apart"] for v in data["task_verdicts"]] == [True, True]
    assert "task_tests" in to_csv(results).splitlines()[0]


def test_an_old_row_without_spread_shows_its_mean_alone(tmp_path: Path):
    old = replace(a_record(), quality=replace(a_record().quality, ppl_se=None, kld_positions=""))
    store = ResultsStore.in_dir(tmp_path)
    store.add(old)
    row = row_from_result(store.all()[0])
    assert row.ppl_se is None and row.kld_paired_se == ()
    assert "± 0.0010 SE" in recommend([row], CPU, None, "quality").text  # its KLD SE was stored


@pytest.mark.parametrize("size", [(120, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_compare_screen_with_tasks_snapshot(snap_compare, size, isolated_user_dirs):
    store_task_results(isolated_user_dirs / "data")
    app = sim_app("none")

    async def run_before(pilot):
        await feed_samples(app, pilot, 2)
        await settle(app, pilot)
        await pilot.press("c")
        await settle(app, pilot)
        await pilot.press("down", "down")
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=run_before)


def test_the_veto_holds_each_of_several_tasks_to_a_bonferroni_share_and_pairs_only_like_prompts():
    from qexplorer.core.tasks.summary import compare_pair

    reference = (True,) * 40 + (False,) * 124
    lost = (False,) * 6 + (True,) * 34 + (False,) * 124  # six lost, none gained: p = 2/64 = 0.03125
    one = summarize([replace(a_record("bf16"), tasks=(task("humaneval", reference),)),
                     replace(a_record("q8_0"), tasks=(task("humaneval", lost),))])
    row = CompareRow(precision="q8_0", label="Q8_0", family=Family.GGUF, mode=SupportMode.NATIVE, weight_bytes=1,
                     peak_bytes=None, plan_bytes=None, prefill_tok_s=None, prefill_sd=None, decode_tok_s=1.0,
                     decode_sd=0.0, ttft_s=None, roofline_pct=None, kld=0.01, top1_pct=None, ppl=None, ppl_ref=None,
                     reference_quantized=False, tasks=tuple(t for t in one if t.precision == "q8_0"))
    assert row.tasks[0].versus_reference.p_value == pytest.approx(0.03125)
    assert row.task_loss() is not None  # one task: α = 0.05
    two = summarize([replace(a_record("bf16"), tasks=(task("humaneval", reference), chains([10] * 8))),
                     replace(a_record("q8_0"), tasks=(task("humaneval", lost), chains([10] * 8)))])
    assert replace(row, tasks=tuple(t for t in two if t.precision == "q8_0")).task_loss() is None  # α = 0.025
    completion = replace(task("humaneval", lost), template="completion")
    assert compare_pair(completion, task("humaneval", reference), "bf16") is None  # another prompt: not paired


def test_when_every_candidate_lost_task_accuracy_kld_decides_and_says_so(tmp_path: Path):
    rows = [r for r in rows_from_results(store_task_results(tmp_path).comparable(str(bundled_model_path())))
            if r.precision == "q4_k_m"]
    result = recommend(rows, CPU, None, "quality")
    assert result.precision == "q4_k_m" and "the task veto cannot choose: ranked by KLD alone" in result.text
