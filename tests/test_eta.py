"""ETA: estimates per phase from the model, the job and this machine's measured rates; the order of a queue;
adaptive repetitions."""

from __future__ import annotations

import json
from pathlib import Path

from qexplorer.core.catalog import Catalog
from qexplorer.core.domain.bench import BenchConfig
from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.eta import (
    DEFAULT_RATES,
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
    assert all(rate > 0 for rate in DEFAULT_RATES.values())


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


def test_rates_are_learned_per_machine_and_an_old_file_belongs_to_the_machine_it_is_on(tmp_path: Path):
    """Issue 26: rates fitted on one CPU said 1:40 for a job that took 3:57 on another. A data directory shared
    by two machines keeps each one's rates; a file from before is this machine's."""
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
    assert amd.rate(bench.key) == (DEFAULT_RATES[bench.key], False)  # the other machine's rate is not this one's
    intel = DurationBook.in_dir(tmp_path, machine="intel · 2 cores · AVX-512 · no GPU")
    assert intel.rate(bench.key) == (3 * bench.seconds / bench.units, True)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "durations.json").write_text(json.dumps({"rates": {bench.key: [0.5]}, "jobs": []}))
    assert DurationBook.in_dir(tmp_path / "old", machine="here").rate(bench.key) == (0.5, True)


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
    assert all(j["seconds"] > 0 and j["label"] == "estimated" for j in jobs.values())
    assert jobs["awq"]["seconds"] > jobs["fp8"]["seconds"]  # calibration costs more than a data-free scheme
    assert jobs["fp8"]["source"] == "from another machine's defaults"
    assert main(["plan", str(folder), "--simulate", "gb10", "--precision", "fp8"]) == 0
    assert "est. job" in capsys.readouterr().out
