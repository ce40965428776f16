"""Compare: the recommendation rules, the Pareto frontier, snapshots, and exports a server loads."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from apps import feed_samples, settle, sim_app

from qexplorer.cli import main
from qexplorer.core.catalog import bundled_model_path
from qexplorer.core.compare import CompareRow, pareto_front, recommend
from qexplorer.core.domain.record import record_from_legacy as legacy
from qexplorer.core.precisions import Hardware
from qexplorer.core.results import ResultsStore
from qexplorer.core.units import GIB, MIB

H100 = Hardware(cuda=True, compute_capability=(9, 0), name="NVIDIA H100")
CPU = Hardware(cuda=False)


def row(key: str, family: str, weight_gib: float, kld: float, decode: float, plan_gib: float | None = None,
        mode: str = "native") -> CompareRow:
    return CompareRow(precision=key, label=key.upper(), family=family, mode=mode, weight_bytes=int(weight_gib * GIB),
                      peak_bytes=None, plan_bytes=int((plan_gib or weight_gib * 1.1) * GIB), prefill_tok_s=1000.0,
                      prefill_sd=10.0, decode_tok_s=decode, decode_sd=1.0, ttft_s=0.1, roofline_pct=50.0, kld=kld,
                      top1_pct=100 - 100 * kld, ppl=6.0 + kld, ppl_ref=6.0, reference_quantized=False)


SEED = [
    row("bf16", "torch", 60, 0.0, 20),
    row("fp8", "torch", 30, 0.002, 35, plan_gib=34),
    row("awq", "torch", 15, 0.03, 45, plan_gib=18),
    row("gptq", "torch", 15, 0.035, 44, plan_gib=18),
    row("int4_rtn", "torch", 15, 0.08, 46, plan_gib=18),
    row("q8_0", "gguf", 32, 0.0015, 30),
    row("q5_k_m", "gguf", 21, 0.011, 38),
    row("q4_k_m", "gguf", 18, 0.031, 42),
    row("q2_k", "gguf", 11, 0.44, 50),
]


def test_quality_first_with_plenty_of_memory_is_fp8():
    result = recommend(SEED, H100, headroom_bytes=100 * GIB, priority="quality")
    assert result.precision == "fp8"  # BF16 and Q8_0 tie with it on KLD; the framework breaks the tie
    assert "KLD (top-256, lower bound) 0.0020" in result.text and "Tied within the measurement with" in result.text
    assert "Runner-up BF16: costs 30.0 GiB" in result.text  # what the runner-up would cost


def test_quality_first_when_fp8_does_not_fit_is_awq_or_gptq():
    result = recommend(SEED, H100, headroom_bytes=20 * GIB, priority="quality")
    assert result.precision in ("awq", "gptq")
    assert "do not fit" in result.text and "FP8 (34.0 GiB)" in result.text


def test_cpu_only_follows_the_measurements():
    # W4A16 has no CPU kernel in vLLM: the torch INT4 rows are transformers fallbacks here
    cpu_rows = [replace(r, fallback=True, mode="dequantized") if r.precision in ("awq", "gptq", "int4_rtn") else r
                for r in SEED]
    assert recommend(cpu_rows, CPU, 100 * GIB, "quality").precision == "q8_0"  # lowest KLD that is served here
    assert recommend(cpu_rows, CPU, 100 * GIB, "memory").precision == "q4_k_m"  # not Q2_K (KLD 0.44)
    assert recommend(cpu_rows, CPU, 100 * GIB, "cpu").precision == "q4_k_m"  # fastest GGUF with KLD ≤ 0.1
    # speed: the INT4 fallbacks' tok/s are not serving speed, so the fastest served row wins
    assert recommend(cpu_rows, CPU, 100 * GIB, "speed").precision == "q4_k_m"


def test_quality_first_picks_the_lower_measured_kld_over_the_rule_of_thumb():
    """The issue's case: on CPU the framework says Q4_K_M, the table says Q8_0 is far closer to the reference and
    fits too."""
    rows = [row("q8_0", "gguf", 0.136, 0.0047, 90.7), row("q4_k_m", "gguf", 0.099, 0.0515, 102.7)]
    result = recommend(rows, CPU, headroom_bytes=13 * GIB, priority="quality")
    assert result.precision == "q8_0" and result.runner_up == "q4_k_m" and "Tied" not in result.text
    assert recommend(rows, CPU, 13 * GIB, "cpu").precision == "q4_k_m"  # fastest GGUF with KLD ≤ 0.1
    # memory first: still the smallest that meets the bar, and not one that misses it
    rows.append(row("q2_k", "gguf", 0.082, 0.39, 120.0))
    assert recommend(rows, CPU, 13 * GIB, "memory").precision == "q4_k_m"
    # a KLD within the tie band of the best (here 0.0044 apart): the framework's Q6_K, and the text says so
    rows.append(row("q6_k", "gguf", 0.130, 0.0091, 95.0))
    tied = recommend(rows, CPU, 13 * GIB, "quality")
    assert tied.precision == "q6_k" and "Tied within the measurement with GGUF Q8_0" not in tied.text
    assert "Tied within the measurement with Q8_0" in tied.text
    # ...and no tie once the measurements are sharper than the band would allow to be wrong
    far = [replace(r, kld=r.kld * 3) for r in rows]
    assert recommend(far, CPU, 13 * GIB, "quality").precision == "q8_0"


def test_a_noisy_speed_is_named_and_ranked_after_quiet_ones():
    rows = [row("q8_0", "gguf", 0.136, 0.0047, 90.0),
            replace(row("q4_k_m", "gguf", 0.099, 0.0515, 150.0), noise="Noisy: other processes used 50 % ...")]
    result = recommend(rows, CPU, 13 * GIB, "speed")
    assert result.precision == "q8_0" and "busy host (noisy)" in result.text and "Q4_K_M" in result.text


def test_fp8_without_fp8_tensor_cores_is_not_preferred():
    a100 = Hardware(cuda=True, compute_capability=(8, 0), name="NVIDIA A100")
    result = recommend(SEED, a100, 100 * GIB, "quality")
    assert result.precision == "q8_0"  # FP8 is emulated there; Q8_0 ties BF16 and is quantized


def test_nothing_fits_and_nothing_measured():
    assert recommend(SEED, H100, 1 * GIB, "quality").precision is None
    assert "Run some precisions first" in recommend([], H100, None).text


def test_pareto_front():
    front = [r.precision for r in pareto_front(SEED)]
    assert front == ["q2_k", "awq", "q5_k_m", "fp8", "q8_0", "bf16"]


def store_fixed_results(data_dir: Path) -> None:
    store = ResultsStore.in_dir(data_dir)
    path = str(bundled_model_path())
    fixed = {
        "bf16": ("torch", "native", 257, 49.1, 0.0, 100.0, 14.61),
        "int8": ("torch", "native", 156, 21.4, 0.0012, 98.9, 14.63),
        "fp8": ("torch", "emulated", 156, 3.0, 0.0031, 97.4, 14.66),
        "gptq": ("torch", "dequantized", 108, 39.1, 0.052, 88.3, 15.40),
        "int4_rtn": ("torch", "dequantized", 108, 41.2, 0.071, 86.1, 15.90),
        "q8_0": ("gguf", "native", 136, 156.1, 0.0047, 95.3, 14.62),
        "q6_k": ("gguf", "native", 130, 160.2, 0.0091, 94.1, 14.75),
        "q4_k_m": ("gguf", "native", 99, 159.0, 0.055, 86.9, 15.60),
        "q2_k": ("gguf", "native", 82, 194.3, 0.39, 65.9, 21.78),
    }
    for key, (family, mode, weight_mib, decode, kld, top1, ppl) in fixed.items():
        store.add(legacy({"model_name": "SmolLM2-135M-Instruct (Q4_1)", "model_path": path, "precision": key,
                   "precision_label": key, "family": family, "mode": mode,
                          "backend": "llama.cpp" if family == "gguf" else "transformers" if mode == "dequantized"
                          else "vllm",
                   "weight_bytes": weight_mib * MIB, "peak_rss_bytes": 3 * weight_mib * MIB,
                   "planned_total_bytes": 3 * weight_mib * MIB, "reference_quantized": True,
                   "decode_tok_s": {"mean": decode, "sd": decode / 50, "n": 5},
                   "prefill_tok_s": {"mean": 10 * decode, "sd": decode / 5, "n": 5},
                   "ttft_s": {"mean": 0.35, "sd": 0.01, "n": 5}, "roofline_pct": 40.0,
                   "quality": {"kld_mean": kld, "same_top1_pct": top1, "ppl": ppl, "ppl_ref": 14.61}}))


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("profile", ["none", "h100"])
def test_compare_screen_snapshot(snap_compare, size, profile, isolated_user_dirs):
    store_fixed_results(isolated_user_dirs / "data")
    app = sim_app(profile)

    async def run_before(pilot):
        await feed_samples(app, pilot, 2)
        await settle(app, pilot)
        await pilot.press("c")
        await settle(app, pilot)
        await pilot.press("down", "down")
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=run_before)


async def test_compare_keys_and_damaged_store(isolated_user_dirs):
    store_fixed_results(isolated_user_dirs / "data")
    app = sim_app("none")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await pilot.press("c")
        await settle(app, pilot)
        screen = app.screen
        assert screen.query_one("#compare-table").row_count == 9
        assert screen.recommendation.precision == "q8_0"  # the lowest KLD of the natively served, ties broken
        await pilot.press("f")  # torch only
        assert screen.query_one("#compare-table").row_count == 5
        await pilot.press("s", "s")  # sort by decode
        assert screen._rows[0].precision == "bf16"
        await pilot.press("o")
        assert screen.priority == "memory"
        (isolated_user_dirs / "data" / "results.sqlite3").write_bytes(b"garbage" * 1000)
        app.load_results()
        await settle(app, pilot)
        assert "damaged" in app.results_error
        assert screen.query_one("#compare-table").row_count == 5  # what was shown stays


def test_results_md_prints_the_seed_table(capsys, isolated_user_dirs):
    store_fixed_results(isolated_user_dirs / "data")
    assert main(["results", "--format", "md", "--model", "default"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| Quantization | Memory | Throughput | Quality |")
    assert "| q8_0 (llama.cpp) | 136.0 MiB weights, 408.0 MiB peak | 156.1 ± 3.1 tok/s decode" in out
    assert main(["results", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert {"tg_avg_ts", "tg_stddev_ts", "pp_avg_ts", "model_size", "kld_mean"} <= set(rows[0])


@pytest.mark.e2e
def test_exported_gguf_loads_in_bare_llama_cpp_and_generates(tmp_path: Path, capsys):
    out = tmp_path / "smol-q4_k_m.gguf"
    assert main(["export", "default", "--precision", "q4_k_m", "--out", str(out)]) == 0
    assert f"llama-server -m {out}" in capsys.readouterr().out
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, verbose=False)
    text = llm("The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert len(llm.tokenize(text.encode(), add_bos=False)) >= 1
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.e2e
def test_exported_compressed_tensors_folder_loads_in_transformers_and_generates(tmp_path: Path, capsys):
    out = tmp_path / "smol-w8a16"
    assert main(["export", "default", "--precision", "int8", "--out", str(out)]) == 0
    assert f"vllm serve {out}" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]


def _stored_row(store: ResultsStore, path: str, key: str, decode: float, prompt: int, depth: int = 0,
                quality: bool = True) -> None:
    record = legacy({"model_name": "m", "model_path": path, "precision": key, "precision_label": key.upper(),
                     "family": "gguf", "mode": "native", "backend": "llama.cpp", "weight_bytes": 100 * MIB,
                     "decode_tok_s": {"mean": decode, "sd": 1.0, "n": 5},
                     "prefill_tok_s": {"mean": 10 * decode, "sd": 1.0, "n": 5}, "prompt_tokens": prompt,
                     "gen_tokens": 128 if prompt == 512 else 16, "repetitions": 5, "threads": 2,
                     **({"quality": {"kld_mean": 0.01, "same_top1_pct": 95.0, "ppl": 14.0, "ppl_ref": 13.9}}
                        if quality else {})})
    if depth:
        record = replace(record, speed=replace(record.speed, depth=depth))
    store.add(record)


def test_rows_measured_with_other_settings_are_shown_marked_and_never_ranked(tmp_path: Path):
    """A5: Q8_0 at pp512/tg128 beside Q2_K from a quick run (pp64/tg16) measured under other settings. Before,
    the newest row per precision was ranked whatever its settings, and the markdown footer gave the first
    row's settings for all."""
    store = ResultsStore.in_dir(tmp_path)
    _stored_row(store, "/m", "q2_k", 1.6, prompt=64)  # an old quick run
    _stored_row(store, "/m", "q4_k_m", 130.0, prompt=512)
    _stored_row(store, "/m", "q4_k_m", 60.0, prompt=512, depth=2048, quality=False)  # a later depth run
    _stored_row(store, "/m", "q8_0", 126.0, prompt=512)
    compared = store.comparable("/m")
    assert [r.precision for r in compared.rows] == ["q4_k_m", "q8_0"]
    assert [r.record.speed.decode_tok_s.mean for r in compared.rows] == [130.0, 126.0]  # not the depth run's 60
    assert [r.precision for r in compared.others] == ["q2_k"]
    from qexplorer.core.compare import row_from_result
    from qexplorer.core.results import to_json, to_markdown

    rows = [row_from_result(r) for r in compared.rows] + [row_from_result(r, compared=False) for r in compared.others]
    assert recommend(rows, CPU, 10 * GIB, priority="speed").precision == "q4_k_m"
    assert all(r.precision != "q2_k" for r in pareto_front(rows))
    markdown = to_markdown(compared.all)
    assert "Q2_K (llama.cpp) (other settings, not compared: pp64/tg16" in markdown
    assert "Compared rows: pp512/tg128 at depth 0, 2 threads" in markdown
    flat = {r["precision"]: r for r in json.loads(to_json(compared.all))["results"]}
    assert flat["q8_0"]["compared"] and not flat["q2_k"]["compared"]


def test_speeds_tie_by_standard_error_like_klds():
    """Review A14: one statistic for both tie rules. 100 vs 108 tok/s with sd 5 over 5 repetitions each differ
    by 2.5 standard errors of the difference: told apart (the old rule, 2 sd of single runs, tied them)."""
    from qexplorer.core.compare import speed_tied

    a = replace(row("q8_0", "gguf", 1, 0.001, 100.0), decode_sd=5.0, decode_n=5)
    b = replace(a, precision="q6_k", decode_tok_s=108.0)
    assert not speed_tied(a, b)
    assert speed_tied(a, replace(b, decode_tok_s=104.0))
    assert speed_tied(replace(a, decode_n=0), replace(b, decode_n=0))  # a legacy row without n: its sd, as before


def test_a_legacy_row_missing_a_figure_shows_it_as_missing_never_zero(tmp_path: Path):
    """Review A15: a schema-1 row with a KLD but no PPL / SEs; before, PPL read 0.00 and every SE 0."""
    from qexplorer.core.compare import row_from_result
    from qexplorer.core.results import flat_row, to_markdown

    store = ResultsStore.in_dir(tmp_path)
    stored = store.by_ids([store.add(legacy({
        "model_name": "m", "model_path": "/m", "precision": "q8_0", "family": "gguf",
        "decode_tok_s": {"mean": 50.0, "sd": 1.0, "n": 3}, "quality": {"kld_mean": 0.002, "same_top1_pct": 98.0}}))])[0]
    compared = row_from_result(stored)
    assert (compared.kld, compared.top1_pct, compared.ppl, compared.kld_se) == (0.002, 98.0, None, None)
    assert compared.prefill_tok_s is None
    flat = flat_row(stored)
    assert flat["ppl"] is None and flat["pp_avg_ts"] is None and flat["kld_mean"] == 0.002
    assert "PPL n/a (ref n/a)" in to_markdown([stored]) and "PPL 0.00" not in to_markdown([stored])
    json.dumps(flat, allow_nan=False)  # valid JSON: no NaN leaks out


def test_depth_rooflines_reach_the_row_and_the_exports(tmp_path: Path):
    from qexplorer.core.compare import row_from_result
    from qexplorer.core.results import flat_row, to_markdown

    store = ResultsStore.in_dir(tmp_path)
    record = legacy({"model_name": "m", "model_path": "/m", "precision": "q8_0", "family": "gguf",
                     "decode_tok_s": {"mean": 50.0, "sd": 1.0, "n": 3}})
    record = replace(record, depth_speeds=(replace(record.speed, depth=512),), depth_rooflines=(61.4,))
    stored = store.by_ids([store.add(record)])[0]
    assert row_from_result(stored).depths[0].roofline_pct == 61.4
    assert json.loads(flat_row(stored)["depths"])[0]["roofline_pct"] == 61.4
    assert "at depth 512: 50.0 ± 1.0 tok/s decode" in to_markdown([stored]) and "61 % of roofline" in to_markdown([stored])


def test_a_quick_first_answer_is_shown_until_its_full_figures_land(tmp_path: Path):
    """Issue 26 item 4: the quick pass answers every precision first; each quick row gives way to its precision's
    full row when that lands, and a precision still waiting keeps its quick row, marked."""
    from qexplorer.core.compare import row_from_result

    made = ResultsStore.in_dir(tmp_path / "made")
    for key in ("q8_0", "q4_k_m"):
        _stored_row(made, "/m", key, 100.0, prompt=64)
    fresh = ResultsStore.in_dir(tmp_path / "run")
    for stored in made.all("/m"):
        fresh.add(replace(stored.record, first_pass=True))  # as the quick jobs store them
    assert {r.precision for r in fresh.comparable("/m").rows} == {"q8_0", "q4_k_m"}
    assert all(row_from_result(r).first_pass for r in fresh.comparable("/m").rows)
    _stored_row(fresh, "/m", "q8_0", 120.0, prompt=512)  # q8_0's full figures land
    shown = fresh.comparable("/m")
    assert [(r.precision, r.record.first_pass) for r in shown.rows] == [("q8_0", False)]
    assert [(r.precision, r.record.first_pass) for r in shown.others] == [("q4_k_m", True)]  # still waiting
