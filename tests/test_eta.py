"""ETA: estimates per phase from the model, the job and this machine's measured rates; the order of a queue;
adaptive repetitions."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from qexplorer.core.calibration import Bound, Calibration
from qexplorer.core.catalog import Catalog
from qexplorer.core.domain.bench import BenchConfig
from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.eta import (
    DEFAULT_COSTS,
    REFERENCE_CALIBRATION,
    DurationBook,
    cost_order,
    estimate_jobs,
    format_duration,
    start_order,
)
from qexplorer.core.precisions import BY_KEY


def specs(data_dir: Path, keys: list[str], quality: bool = True) -> list[JobSpec]:
    return [JobSpec(model_ref="default", precision=k, data_dir=str(data_dir), quality=quality) for k in keys]


def test_the_first_job_pays_for_the_shared_work_and_the_reference_row_has_no_quality_pass(tmp_path: Path):
    model = Catalog().resolve("default")
    first, second, bf16 = estimate_jobs(model, specs(tmp_path, ["q8_0", "q4_k_m", "bf16"]), tmp_path,
                                        vllm_found=True)
    assert [p.name for p in first.phases][:3] == ["start", "dequantize", "reference"]
    assert "dequantize" not in [p.name for p in second.phases] and "reference" not in [p.name for p in second.phases]
    assert first.total_s > second.total_s > 0
    # bf16 is the reference's own checkpoint: nothing to quantize, and only vLLM's cross-check as quality
    assert "quantize" not in [p.name for p in bf16.phases] and "load" not in [p.name for p in bf16.phases]
    assert first.source == "from another machine's defaults"


def test_rates_measured_here_replace_the_defaults(tmp_path: Path):
    model = Catalog().resolve("default")
    (estimate,) = estimate_jobs(model, specs(tmp_path, ["q4_k_m"], quality=False), tmp_path, vllm_found=False)
    bench = next(p for p in estimate.phases if p.name == "benchmark")
    book = DurationBook.in_dir(tmp_path)
    book.record(estimate, [("start", 4.0), ("quantize", 2.0), ("load", 0.5), ("benchmark", 2 * bench.seconds),
                           ("calibrate", 1.0)])
    (again,) = estimate_jobs(model, specs(tmp_path, ["q4_k_m"], quality=False), tmp_path, vllm_found=False)
    assert next(p for p in again.phases if p.name == "benchmark").seconds == 2 * bench.seconds
    assert again.source == "from jobs that ran on this machine"
    stored = json.loads((tmp_path / "durations.json").read_text())["jobs"][-1]
    assert stored["predicted_s"] == round(estimate.total_s, 1) and stored["actual_s"] > 0  # predicted vs actual


def test_time_left_counts_down_within_a_phase_and_never_below_zero(tmp_path: Path):
    model = Catalog().resolve("default")
    (estimate,) = estimate_jobs(model, specs(tmp_path, ["q8_0"], quality=False), tmp_path, vllm_found=False)
    bench = next(p for p in estimate.phases if p.name == "benchmark")
    after = sum(p.seconds for p in estimate.phases[[p.name for p in estimate.phases].index("benchmark") + 1:])
    assert estimate.left_s("benchmark", 0.0) == bench.seconds + after
    assert estimate.left_s("benchmark", 10 * bench.seconds) == after
    assert estimate.left_s("no such phase", 1.0) == estimate.total_s


def test_cheapest_first_and_durations_read_like_a_clock():
    model = Catalog().resolve("default")
    order = cost_order(model, [BY_KEY[k] for k in ("gptq", "bf16", "int8", "q8_0", "q4_k_m")])
    assert [p.key for p in order] == ["q8_0", "q4_k_m", "bf16", "int8", "gptq"]  # calibrated last
    # overlapping, jobs start cheapest first, then the longest preparations (quantize + vLLM start, vLLM start),
    # then the cheap re-quantizations (measured as soon as the CPU is free), calibrated methods still last
    started = start_order(model, [BY_KEY[k] for k in ("gptq", "bf16", "int8", "q8_0", "q4_k_m")])
    assert [p.key for p in started] == ["q8_0", "int8", "bf16", "q4_k_m", "gptq"]
    assert (format_duration(42), format_duration(125), format_duration(7300)) == ("42 s", "2:05", "2 h 01 min")
    assert all(cost.fixed_s + cost.per_unit_s > 0 for cost in DEFAULT_COSTS.values())


def test_adaptive_repetitions_stop_when_the_mean_is_known():
    config = BenchConfig(repetitions=5, min_repetitions=3, sem_target_pct=2.0)
    quiet, noisy = [1.00, 1.01, 0.99], [1.0, 1.3, 0.8]
    assert not config.settled(quiet[:2], quiet[:2])  # fewer than the minimum
    assert config.settled(quiet, quiet)  # SEM 0.6 % after three
    assert not config.settled(quiet, noisy)  # one series still uncertain: go on
    assert config.settled(noisy + [1.1, 0.9], noisy + [1.1, 0.9])  # the cap ends it


def test_a_moes_forward_passes_are_estimated_on_its_active_parameters(tmp_path: Path):
    """Review A16 / issue 26: a 30B-A3B MoE's reference and quality passes read ~3 B parameters per token, so
    they are estimated close to a dense 3 B model's - not 10× longer on its 30 B total."""
    from models import QWEN3_CODER_30B_A3B, write_config

    from qexplorer.core.readers import spec_from_path

    moe = spec_from_path(write_config(tmp_path / "moe", QWEN3_CODER_30B_A3B))
    dense = spec_from_path(write_config(tmp_path / "dense", {  # a dense Llama of ~3.3 B, the MoE's active size
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6656,
        "vocab_size": 151936, "tie_word_embeddings": False, "max_position_embeddings": 32768,
        "torch_dtype": "bfloat16"}))
    assert moe.total_params > 8 * moe.active_params and abs(dense.total_params / moe.active_params - 1) < 0.1

    def seconds(spec, phase: str) -> float:
        [estimate] = estimate_jobs(spec, [JobSpec(model_ref=spec.path, precision="q8_0", data_dir=str(tmp_path),
                                                  quality=True)], tmp_path)
        return sum(p.seconds for p in estimate.phases if p.name == phase)

    for phase in ("reference", "quality"):
        ratio = seconds(moe, phase) / seconds(dense, phase)
        assert 0.8 < ratio < 1.25, (phase, ratio)  # on total parameters it would be ~9×


def test_costs_are_learned_per_machine_and_an_old_file_learns_again(tmp_path: Path):
    """Issue 26: rates fitted on one CPU said 1:40 for a job that took 3:57 on another. A data directory shared
    by two machines keeps each one's factors; seconds per unit from before the costs had a fixed part are set
    aside (they would be misread as factors), the jobs' history kept."""
    from qexplorer.core.machine import instruction_set, machine_key

    assert instruction_set({"avx2", "avx512f", "amx_tile"}) == "AMX" and instruction_set({"avx2"}) == "AVX2"
    assert instruction_set({"asimd", "sve"}) == "SVE" and " cores · " in machine_key()
    model = Catalog().resolve("default")
    jobs = specs(tmp_path, ["q4_k_m"], quality=False)
    (estimate,) = estimate_jobs(model, jobs, tmp_path, vllm_found=False)
    bench = next(p for p in estimate.phases if p.name == "benchmark")
    DurationBook.in_dir(tmp_path, machine="intel · 2 cores · AVX-512 · no GPU").record(
        estimate, [("benchmark", 3 * bench.seconds)])
    amd = DurationBook.in_dir(tmp_path, machine="amd · 2 cores · AVX2 · no GPU")
    assert amd.factor(bench.key) is None  # the other machine's cost is not this one's
    intel = DurationBook.in_dir(tmp_path, machine="intel · 2 cores · AVX-512 · no GPU")
    assert intel.factor(bench.key) == 3.0
    (again,) = estimate_jobs(model, jobs, tmp_path, vllm_found=False, book=intel)
    assert next(p for p in again.phases if p.name == "benchmark").seconds == 3 * bench.seconds
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "durations.json").write_text(json.dumps({"rates": {bench.key: [0.5]}, "jobs": [{"x": 1}]}))
    old = DurationBook.in_dir(tmp_path / "old", machine="here")
    assert old.factor(bench.key) is None and old.jobs() == [{"x": 1}]


def test_a_fixed_part_keeps_a_small_models_cost_from_inflating_a_large_ones(tmp_path: Path):
    """The costs are fixed + per unit: a phase learned on the 135 M model predicts a 30 B one from the same
    factor, so the 30 B estimate grows with its units, not with the small model's seconds per unit."""
    from models import QWEN3_CODER_30B_A3B, write_config

    from qexplorer.core.readers import spec_from_path

    small = Catalog().resolve("default")
    large = spec_from_path(write_config(tmp_path / "moe", QWEN3_CODER_30B_A3B))
    book = DurationBook.in_dir(tmp_path / "data", machine="here")
    [first] = estimate_jobs(small, specs(tmp_path / "data", ["q8_0"]), tmp_path / "data", vllm_found=False,
                            book=book)
    book.record(first, [(p.name, 2 * p.seconds) for p in first.phases])  # this machine: twice the defaults
    [big] = estimate_jobs(large, specs(tmp_path / "data", ["q8_0"]), tmp_path / "data", vllm_found=False,
                          book=book)
    learned = {p.key for p in first.phases}
    assert {p.key for p in big.phases} & learned
    for part in big.phases:
        cost = DEFAULT_COSTS[part.key]
        factor = 2 if part.key in learned else 1  # the converter never ran here: its default as it is
        assert abs(part.seconds - factor * (cost.fixed_s + cost.per_unit_s * part.units)) < 1e-6, part
    start = next(p for p in big.phases if p.name == "start")
    assert start.seconds == 2 * DEFAULT_COSTS[start.key].fixed_s  # a start is a start, whatever the size


def test_a_machine_with_nothing_learned_is_calibrated_and_each_phase_scales_with_its_kind_of_work(tmp_path):
    """Issue 26 item 4: with nothing learned, the estimate scales the defaults by this machine's calibration
    against the reference machine's, per kind of work: a CPU whose BF16 matmuls are 3× slower (no AVX-512 BF16)
    gets 3× the BF16 phases and the same llama.cpp phases."""
    model = Catalog().resolve("default")
    jobs = specs(tmp_path, ["q8_0", "bf16"])
    book = DurationBook.in_dir(tmp_path, machine="avx2 box")
    plain = estimate_jobs(model, jobs, tmp_path, vllm_found=True, book=book)
    ref = REFERENCE_CALIBRATION
    book.keep_calibration(Calibration(python_mops=ref.python_mops, bf16_gflops=ref.bf16_gflops / 3,
                                      fp32_gflops=ref.fp32_gflops, copy_gbs=ref.copy_gbs, threads=2))
    scaled = estimate_jobs(model, jobs, tmp_path, vllm_found=True, book=DurationBook.in_dir(tmp_path, "avx2 box"))
    for before, after in zip(plain, scaled, strict=True):
        assert after.source == "from defaults scaled by this machine's calibration"
        for a, b in zip(before.phases, after.phases, strict=True):
            expected = 3.0 if DEFAULT_COSTS[a.key].bound == Bound.BF16 else 1.0
            assert abs(b.seconds - expected * a.seconds) < 1e-9, (a.key, a.seconds, b.seconds)
    assert any(DEFAULT_COSTS[p.key].bound == Bound.BF16 for p in scaled[1].phases)


def test_calibration_measures_this_machine_once_in_a_child_and_keeps_it(tmp_path: Path, monkeypatch):
    """The first use measures (a child process: torch stays out of the caller), the second reads it back."""
    from qexplorer.core.session import calibrate_machine

    monkeypatch.delenv("QEXPLORER_NO_CALIBRATION")
    said: list[str] = []
    calibrate_machine(tmp_path, 1, said.append)
    found = DurationBook.in_dir(tmp_path).calibration()
    assert found is not None and found.bf16_gflops > 0 and found.copy_gbs > 0 and found.threads == 1
    assert said[0].startswith("calibrating") and said[1].startswith("calibrated: BF16")
    calibrate_machine(tmp_path, 1, said.append)
    assert len(said) == 2  # nothing measured again


def test_the_plan_command_prints_each_precisions_estimated_job_time(capsys, tmp_path, monkeypatch):
    """Issue 26, must show: `qexplorer plan` for the Qwen3-Coder-30B-A3B config under --simulate gb10 shows a job
    time per precision, labelled estimated, with where the rates come from."""
    from models import QWEN3_CODER_30B_A3B, write_config

    from qexplorer.cli import main

    monkeypatch.setenv("QEXPLORER_DATA_DIR", str(tmp_path / "data"))
    folder = write_config(tmp_path / "qwen3-coder-30b-a3b", QWEN3_CODER_30B_A3B)
    assert main(["plan", str(folder), "--simulate", "gb10", "--json", "--precision", "fp8,awq,q4_k_m"]) == 0
    document = json.loads(capsys.readouterr().out)
    jobs = {p["precision"]: p["job_estimate"] for p in document["plans"]}
    assert all(j["seconds"] > 0 and j["label"] == "estimated" and j["projected"] for j in jobs.values())
    assert jobs["awq"]["seconds"] > jobs["fp8"]["seconds"]  # calibration costs more than a data-free scheme
    assert jobs["fp8"]["source"] == "as a projection for NVIDIA GB10 from published figures"
    # every projected phase says what it rests on; the benchmark on GB10's published bandwidth
    assert all(len(phase) == 3 and phase[2] for phase in jobs["fp8"]["phases"])
    assert "273 GB/s" in dict((p[0], p[2]) for p in jobs["fp8"]["phases"])["benchmark"]
    assert main(["plan", str(folder), "--simulate", "gb10", "--precision", "fp8", "--quality"]) == 0
    out = capsys.readouterr().out
    assert "est. job" in out and "projection, per phase" in out and "reference:" in out


def test_a_first_look_queues_a_quick_pass_of_every_precision_before_the_full_method(tmp_path: Path):
    """Issue 26 item 4: every precision not measured before gets a quick job (pp64/tg16 × 2, quality on the first
    1024 tokens) ahead of the full jobs; the full jobs find the artifacts made but need their own reference; a
    precision already measured, a --quick run and --no-quick-pass get none."""
    from qexplorer.core.session import QUICK_QUALITY_TOKENS, RunOptions, plan_run

    model = Catalog().resolve("default")
    chosen = [BY_KEY[k] for k in ("bf16", "q8_0", "q4_k_m")]
    options = RunOptions(quality=True)
    plan = plan_run("default", model, chosen, options, None, tmp_path)
    assert [(s.precision, s.first_pass) for s in plan.specs] == [
        ("q8_0", True), ("bf16", True), ("q4_k_m", True), ("q8_0", False), ("bf16", False), ("q4_k_m", False)]
    quick, full = plan.specs[0], plan.specs[3]
    assert (quick.bench.prompt_tokens, quick.bench.gen_tokens, quick.bench.repetitions) == (64, 16, 2)
    assert quick.quality_tokens == QUICK_QUALITY_TOKENS and full.quality_tokens == 4096
    names = [[p.name for p in e.phases] for e in plan.estimates]
    assert "quantize" in names[0] and "quantize" not in names[3]  # the artifact is made once, by the quick job
    assert "reference" in names[0] and "reference" in names[3]  # 1024 tokens, then 4096
    assert plan.first_answers_s == sum(e.total_s for e in plan.estimates[:3]) < plan.total_s
    assert plan.order_text.startswith("q8_0 (quick) → bf16 (quick)")
    again = plan_run("default", model, chosen, options, None, tmp_path, measured={"q8_0"})
    assert [s.precision for s in again.specs if s.first_pass] == ["bf16", "q4_k_m"]
    for other in (replace(options, bench=BenchConfig.quick()), replace(options, first_answer=False)):
        assert not any(s.first_pass for s in plan_run("default", model, chosen, other, None, tmp_path).specs)


def test_the_users_own_bf16_folder_costs_a_hash_once(tmp_path: Path):
    """Issue 26 item 2: the bf16 job of a Hugging Face folder hashes the user's files on its first run only
    (core.artifacts keeps the hash): its start is estimated per GiB then, and as a plain start afterwards."""
    from models import QWEN3_CODER_30B_A3B, write_config

    from qexplorer.core.artifacts import artifact_sha256, model_key
    from qexplorer.core.readers import spec_from_path

    folder = write_config(tmp_path / "moe", QWEN3_CODER_30B_A3B)
    spec = spec_from_path(folder)
    data = tmp_path / "data"
    job = [JobSpec(model_ref=str(folder), precision="bf16", data_dir=str(data))]
    [first] = estimate_jobs(spec, job, data, vllm_found=True)
    start = first.phases[0]
    assert start.key == "start:hash" and start.units > 50  # GiB of BF16 weights (config-only: the planned size)
    work_dir = data / "artifacts" / model_key(spec)
    work_dir.mkdir(parents=True)
    artifact_sha256(folder, work_dir)
    [again] = estimate_jobs(spec, job, data, vllm_found=True)
    assert again.phases[0].key == "start" and again.phases[0].seconds < start.seconds
