"""Planner: the seed's ladder, GQA-aware KV cache, verdicts, and plans checked against real files."""

from __future__ import annotations

import ctypes
import dataclasses
import json
from pathlib import Path

import pytest
from models import LLAMA_31_8B, QWEN3_CODER_30B_A3B, write_config

from qexplorer.cli import main
from qexplorer.core.catalog import Catalog, bundled_model_path
from qexplorer.core.errors import UserError
from qexplorer.core.gguf_header import read_gguf_header
from qexplorer.core.planner import PlanRequest, kv_bytes_per_token, plan_model, verdict, weight_bytes
from qexplorer.core.precisions import BY_KEY, Hardware, get, parse_list
from qexplorer.core.readers import spec_from_path
from qexplorer.core.simulate import simulated_sampler
from qexplorer.core.units import GIB, KIB, MIB


def plans_by_key(spec, snapshot=None, **request):
    return {p.precision: p for p in plan_model(spec, PlanRequest(**request), snapshot)}


def test_plan_default_json(capsys):
    assert main(["plan", "default", "--json", "--simulate", "none"]) == 0
    data = json.loads(capsys.readouterr().out)
    params = data["model"]["total_params"]
    plans = {p["precision"]: p for p in data["plans"]}
    w = {k: p["weight_bytes"] for k, p in plans.items()}
    assert abs(w["bf16"] - 2 * params) <= 0.05 * 2 * params
    assert w["fp32"] > w["bf16"] > max(w["fp8"], w["int8"], w["q8_0"])
    assert min(w["fp8"], w["int8"], w["q8_0"]) > w["q4_k_m"] > w["q2_k"]
    # embeddings (21 % of this model) stay BF16 under FP8: more than 1 byte per parameter
    assert w["fp8"] > 1.15 * params
    assert data["notes"] and "Q4_1" in data["notes"][0]
    for plan in data["plans"]:
        assert plan["total_bytes"] == plan["weight_bytes"] + plan["kv_cache_bytes"] + plan["overhead_bytes"]
        assert plan["verdict"] in {"fits", "tight", "does not fit"}


def test_qwen3_coder_ladder(tmp_path: Path):
    spec = spec_from_path(write_config(tmp_path / "q", QWEN3_CODER_30B_A3B))
    plans = plans_by_key(spec)
    gb = {k: p.weight_bytes / 1e9 for k, p in plans.items()}
    assert gb["fp32"] == pytest.approx(120, rel=0.05)
    assert gb["bf16"] == pytest.approx(60, rel=0.05)
    assert gb["fp8"] == pytest.approx(30, rel=0.05)
    assert gb["awq"] == pytest.approx(15, rel=0.15)  # embeddings + lm_head stay BF16: 1.2 GB of it
    assert plans["bf16"].kv_bytes_per_token == 96 * KIB


def test_llama_kv_cache_is_gqa_aware(tmp_path: Path):
    spec = spec_from_path(write_config(tmp_path / "l", LLAMA_31_8B))
    assert kv_bytes_per_token(spec, "f16") == 128 * KIB
    assert plans_by_key(spec, context=8192)["bf16"].kv_cache_bytes == 1 * GIB
    assert plans_by_key(spec, context=8192, batch=2, kv_dtype="fp8")["bf16"].kv_cache_bytes == 1 * GIB


def test_group_size_divides_the_model():
    spec = Catalog().resolve("default")
    assert get("int4_rtn").group_size(spec) == 64  # 576 is not a multiple of 128


def test_verdicts():
    assert verdict(10 * GIB, None) == ("unknown", None)
    assert verdict(10 * GIB, 9 * GIB)[0] == "does not fit"
    assert verdict(10 * GIB, int(10.5 * GIB))[0] == "tight"
    assert verdict(10 * GIB, 20 * GIB) == ("fits", 10 * GIB)


def test_verdict_against_live_headroom(tmp_path: Path):
    spec = spec_from_path(write_config(tmp_path / "q", QWEN3_CODER_30B_A3B))
    sampler = simulated_sampler("gb10")
    sampler.host.machine.extra_used_bytes = 30 * GIB  # someone else is using the box
    plans = plans_by_key(spec, sampler.sample(), context=32768)
    assert plans["bf16"].verdict == "does not fit" and plans["bf16"].margin_bytes < 0
    assert plans["awq"].verdict == "fits"
    assert plans["fp8"].support == "native" and plans["fp8"].runs_on == "GPU"


def test_support_labels():
    assert get("fp8").support(Hardware(cuda=False)).mode == "emulated"
    # below CC 8.9 vLLM serves FP8 through Marlin, weight-only (quantization/utils/marlin_utils_fp8.py l. 108)
    assert get("fp8").support(Hardware(cuda=True, compute_capability=(8, 0))).mode == "weight-only"
    assert get("fp8").support(Hardware(cuda=True, compute_capability=(12, 1))).mode == "native"
    assert get("q4_k_m").support(Hardware(cuda=False)).mode == "native"
    with pytest.raises(UserError, match="Unknown precision 'q9'"):
        parse_list("bf16,q9")
    with pytest.raises(UserError, match="KV-cache dtype"):
        PlanRequest(kv_dtype="int3")


def test_cli_plan_text_and_options(capsys):
    assert main(["plan", "default", "--simulate", "gb10", "--context", "8192", "--precision", "bf16,q4_k_m"]) == 0
    out = capsys.readouterr().out
    assert "BF16" in out and "GGUF Q4_K_M" in out and "fits" in out and "GiB" in out


@pytest.mark.e2e
def test_gguf_plans_match_llama_cpp_quantizer(tmp_path: Path):
    """Planned weight bytes vs the tensors llama.cpp actually writes (within 5 %)."""
    import llama_cpp

    spec = Catalog().resolve("default")
    ftypes = {"q8_0": 7, "q6_k": 18, "q5_k_m": 17, "q4_k_m": 15, "q3_k_m": 12, "q2_k": 10}
    for key, ftype in ftypes.items():
        out = tmp_path / f"{key}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread, params.allow_requantize = ftype, 2, True
        assert llama_cpp.llama_model_quantize(str(bundled_model_path()).encode(), str(out).encode(),
                                              ctypes.byref(params)) == 0
        actual = sum(t.n_bytes for t in read_gguf_header(out).tensors)
        assert weight_bytes(spec, BY_KEY[key]) == pytest.approx(actual, rel=0.05), key


# ----------------------------------------------------------------------------- the roofline's denominator
def test_qwen3_coder_roofline_reads_the_active_experts_not_all_of_them(tmp_path: Path):
    """Qwen3-Coder-30B-A3B: 30.5 B parameters, 3.35 B active (8 of 128 experts + everything shared). One decoded
    token reads the active weights less the embedding table (one row of it: a lookup) - 3.04 B parameters,
    ≈ 6.1 GB in BF16 - not 61 GB, plus the KV cache at the mean decode depth."""
    from qexplorer.core.planner import active_weight_fraction, decode_bytes_per_token

    spec = spec_from_path(write_config(tmp_path / "qwen3", QWEN3_CODER_30B_A3B))
    assert 3.3e9 < spec.active_params < 3.4e9 and 30e9 < spec.total_params < 31e9
    bf16 = BY_KEY["bf16"]
    weights = weight_bytes(spec, bf16)
    read_params = weights * active_weight_fraction(spec, bf16) / 2
    embedding = next(g.params for g in spec.groups if g.role == "embedding")
    assert read_params == pytest.approx(spec.active_params - embedding, rel=1e-3)
    assert 3.0e9 < read_params < 3.4e9  # ≈ 3.3 B active, not 30.5 B: the old figure was ≈ 9× too high
    per_token = decode_bytes_per_token(spec, bf16, weights, gen_tokens=128, depth=4096)
    kv = kv_bytes_per_token(spec, "f16") * (4096 + 64)
    assert per_token == pytest.approx(weights * active_weight_fraction(spec, bf16) + kv, rel=1e-6)


def test_a_roofline_above_100_percent_is_never_shown_as_a_fact():
    from qexplorer.core.bench.bandwidth import roofline_note
    from qexplorer.core.compare import row_from_result
    from qexplorer.core.domain.bench import roofline_pct
    from qexplorer.core.domain.record import ModelIdentity, RunRecord
    from qexplorer.core.results import StoredResult

    pct = roofline_pct(decode_tok_s=300.0, bytes_per_token=100e6, bandwidth_bytes_s=20e9)  # 30 GB/s > 20 GB/s
    assert pct == pytest.approx(150.0)
    note = roofline_note(pct, "measured (STREAM copy, 2 threads)")
    assert note and "not a measured fact" in note and "150 %" in note
    assert roofline_note(99.0, "published") is None
    record = RunRecord(model=ModelIdentity("m", "/m"), precision="q8_0", precision_label="Q8_0", family="gguf",
                       roofline_pct=pct, roofline_note=note)
    stored = StoredResult(id=1, created_at=0.0, status="ok", error=None, record=record)
    assert row_from_result(stored).roofline_suspect


def test_host_bandwidth_is_measured_on_the_benchmarks_thread_count(tmp_path: Path, monkeypatch):
    from qexplorer.core.bench import bandwidth

    calls: list[int] = []
    monkeypatch.setattr(bandwidth, "measure_host_bandwidth", lambda threads: calls.append(threads) or 1e10 * threads)
    cache = tmp_path / "bw.json"
    assert bandwidth.host_bandwidth(cache, "cpu X", 2) == (2e10, "measured (STREAM copy, 2 threads)")
    assert bandwidth.host_bandwidth(cache, "cpu X", 2)[1].endswith("cached)")
    assert bandwidth.host_bandwidth(cache, "cpu X", 1)[0] == 1e10
    assert calls == [2, 1]
    assert bandwidth.published_bandwidth("NVIDIA GB10") == 273e9


def test_the_job_peak_covers_the_quality_pass_and_the_reference_only_where_it_is_built(tmp_path: Path):
    """The first quality job of a model computes the reference (PyTorch + the BF16 model + logits); the jobs
    after it reuse it. A llama.cpp candidate holds every position's logits; a vLLM one its prompt log-probs."""
    from qexplorer.core.domain.bench import BenchConfig
    from qexplorer.core.domain.spec import JobSpec
    from qexplorer.core.planner import logits_bytes, plan_job_peak, reference_peak
    from qexplorer.core.session import plan_jobs

    spec = Catalog().resolve("default")
    bench = BenchConfig.quick()
    template = JobSpec(model_ref="default", precision="", data_dir=str(tmp_path), bench=bench, quality=True)
    jobs = plan_jobs(spec, [get("q8_0"), get("q4_k_m"), get("bf16")], None, template).specs
    bare = {k: plan_job_peak(spec, get(k), bench, on_gpu=False) for k in ("q8_0", "q4_k_m", "bf16")}
    logits = logits_bytes(spec, 512)
    assert logits == 512 * 49152 * 4
    first, second, third = (j.planned_peak_bytes for j in jobs)
    assert first >= reference_peak(spec, 512) > second  # the reference pass is in the first job only
    assert second > bare["q4_k_m"] + 6 * logits  # llama.cpp's candidate pass: every position's logits
    # vLLM's prompt log-probs inside its server, which is started long enough for a quality chunk (its KV cache
    # rounded to whole blocks as engines.vllm.launch_settings asks for it)
    from qexplorer.core.planner import kv_bytes_per_token
    from qexplorer.core.serving.vllm_launch import kv_cache_bytes

    kv = kv_bytes_per_token(spec, "bf16")
    longer = kv_cache_bytes(kv, 512 + 16, 1, "cpu") - kv_cache_bytes(kv, bench.context_tokens + 16, 1, "cpu")
    assert longer > 0 and third == bare["bf16"] + 3 * logits + longer
    without = dataclasses.replace(template, quality=False)
    assert plan_jobs(spec, [get("q8_0")], None, without).specs[0].planned_peak_bytes == bare["q8_0"]


def test_plan_json_carries_the_vllm_command_its_start_check_and_kernel_on_a_gb10_and_an_h100(capsys):
    """Issue 23, must show: per Hugging Face precision the exact `vllm serve` flags, the utilization that passes
    vLLM's start-up check, the CUDA-graph setting, --dtype, the expected kernel and vLLM's GPU overhead."""
    for profile, fp8_kernel in (("gb10", "CutlassFP8ScaledMMLinearKernel"), ("h100", "CutlassFP8ScaledMMLinearKernel")):
        assert main(["plan", "default", "--simulate", profile, "--json"]) == 0
        plans = {p["precision"]: p for p in json.loads(capsys.readouterr().out)["plans"]}
        assert plans["q4_k_m"]["vllm"] is None  # llama.cpp serves GGUF
        bf16, fp32 = plans["bf16"]["vllm"], plans["fp32"]["vllm"]
        assert "--enforce-eager" not in bf16["command"] and "FULL_DECODE_ONLY" in bf16["command"]
        assert f"--gpu-memory-utilization {bf16['utilization']:.2f}" in bf16["command"]
        assert "--dtype bfloat16" in bf16["command"] and "--dtype float32" in fp32["command"]
        assert plans["fp8"]["vllm"]["expected_kernel"].startswith(fp8_kernel)
        assert plans["bf16"]["overhead_bytes"] == bf16["overhead_bytes"] >= 5 * GIB  # vLLM's GPU overhead
    assert main(["plan", "default", "--json"]) == 0  # this CPU: vLLM-CPU stays eager, no utilization
    cpu = {p["precision"]: p for p in json.loads(capsys.readouterr().out)["plans"]}["bf16"]["vllm"]
    assert "--enforce-eager" in cpu["command"] and cpu["utilization"] is None


# ------------------------------------------------------------------ capacity (issue 25)
LLAMA_BF16_TOKEN = 2 * 32 * 8 * 128 * 2  # 128 KiB per token: 32 layers × 8 KV heads × head_dim 128 × K and V × 2 B


def test_capacity_vllm_counts_whole_blocks_and_the_null_block():
    from qexplorer.core.capacity import plan_capacity

    assert LLAMA_BF16_TOKEN == 128 * KIB
    # 30 GiB headroom − 16 GiB weights − 6 GiB overhead = 8 GiB = 4096 blocks of 16 tokens × 128 KiB (2 MiB);
    # one is vLLM's null block: 4095 usable; a 4096-token sequence takes 256 blocks (512 MiB) -> 15, not 16
    cap = plan_capacity("vllm", "cuda", "bf16", LLAMA_BF16_TOKEN, 4096, 30 * GIB, 16 * GIB, 6 * GIB)
    assert (cap.sequences, cap.kv_budget_bytes, cap.kv_bytes_per_sequence) == (15, 8 * GIB, 512 * 1024 * KIB)
    assert cap.limit is None
    assert cap.rule == "vLLM: 16-token blocks (2.0 MiB, all layers), 256 per sequence, 1 null block: 4,095 usable"
    # a context that is not a whole number of blocks rounds up per sequence: 4100 tokens = 257 blocks
    assert plan_capacity("vllm", "cuda", "bf16", LLAMA_BF16_TOKEN, 4100, 30 * GIB, 16 * GIB, 6 * GIB).sequences == 15
    assert plan_capacity("vllm", "cuda", "bf16", LLAMA_BF16_TOKEN, 4000, 30 * GIB, 16 * GIB, 6 * GIB).sequences == 16
    # vLLM-CPU pages in 128-token blocks (16 MiB here): 512 - 1 usable, 32 per sequence
    assert plan_capacity("vllm", "cpu", "bf16", LLAMA_BF16_TOKEN, 4096, 30 * GIB, 16 * GIB, 6 * GIB).sequences == 15


def test_capacity_fp8_kv_doubles_it():
    from qexplorer.core.capacity import plan_capacity

    bf16 = plan_capacity("vllm", "cuda", "bf16", LLAMA_BF16_TOKEN, 4096, 30 * GIB, 16 * GIB, 6 * GIB)
    fp8 = plan_capacity("vllm", "cuda", "fp8", LLAMA_BF16_TOKEN // 2, 4096, 30 * GIB, 16 * GIB, 6 * GIB)
    assert fp8.kv_bytes_per_sequence * 2 == bf16.kv_bytes_per_sequence
    assert fp8.sequences == 31 == 2 * bf16.sequences + 1  # 8191 usable 1 MiB blocks // 256


def test_capacity_llama_cpp_slots_are_padded_to_256_cells_and_capped():
    from qexplorer.core.capacity import plan_capacity

    q8_token = 2 * 32 * 8 * 128 * 34 // 32  # 68 KiB: q8_0 stores 32 values in 34 bytes
    # 4000 tokens per slot: llama.cpp pads each slot to 4096 cells (272 MiB); 8 GiB / 272 MiB = 30.1 -> 30
    cap = plan_capacity("llama.cpp", "cuda", "q8_0", q8_token, 4000, 30 * GIB, 16 * GIB, 6 * GIB)
    assert (cap.sequences, cap.kv_bytes_per_sequence) == (30, 4096 * 68 * KIB)
    # no null block in llama.cpp: 8 GiB holds exactly 16 f16 slots of 4096 tokens
    assert plan_capacity("llama.cpp", "cuda", "f16", LLAMA_BF16_TOKEN, 4096, 30 * GIB, 16 * GIB, 6 * GIB
                         ).sequences == 16
    tiny = plan_capacity("llama.cpp", "cpu", "f16", 1 * KIB, 256, 30 * GIB, 16 * GIB, 6 * GIB)
    assert tiny.sequences == 256 and "(memory for 32,768)" in tiny.rule  # LLAMA_MAX_SEQ


def test_capacity_is_zero_with_its_reason_or_absent_without_headroom_or_dtype():
    from qexplorer.core.capacity import plan_capacity

    over = plan_capacity("vllm", "cuda", "bf16", LLAMA_BF16_TOKEN, 4096, 20 * GIB, 16 * GIB, 6 * GIB)
    assert over.sequences == 0 and over.kv_budget_bytes == -2 * GIB
    assert over.limit == ("weights (16.0 GiB) + overhead (6.0 GiB) leave nothing of the 20.0 GiB headroom: no room "
                          "for one 4,096-token sequence (512.0 MiB of bf16 KV cache)")
    short = plan_capacity("llama.cpp", "cuda", "f16", LLAMA_BF16_TOKEN, 4096, int(22.25 * GIB), 16 * GIB, 6 * GIB)
    assert short.sequences == 0 and "leave 256.0 MiB of the 22.2 GiB headroom" in short.limit
    unknown = plan_capacity("vllm", "cuda", "bf16", LLAMA_BF16_TOKEN, 4096, None, 16 * GIB, 6 * GIB)
    assert unknown.sequences is None and unknown.kv_budget_bytes is None and "headroom" in unknown.limit
    assert plan_capacity("vllm", "cuda", "q8_0", 68 * KIB, 4096, 30 * GIB, 16 * GIB, 6 * GIB).limit.startswith(
        "vllm has no q8_0 KV cache")
    assert plan_capacity("llama.cpp", "cuda", "fp8", 64 * KIB, 4096, 30 * GIB, 16 * GIB, 6 * GIB).sequences is None


def test_plan_capacity_on_a_gb10_follows_the_weights(tmp_path: Path):
    """The seed's case: on a GB10, FP8 weights leave room for more sequences than BF16; FP8 KV doubles that."""
    spec = spec_from_path(write_config(tmp_path / "l", LLAMA_31_8B))
    snapshot = simulated_sampler("gb10").sample()
    plans = plans_by_key(spec, snapshot, context=4096)
    bf16, fp8 = plans["bf16"], plans["fp8"]
    assert bf16.engine == "vllm" and bf16.runs_on == "GPU" and bf16.capacity.context == 4096
    budget = bf16.headroom_bytes - bf16.weight_bytes - bf16.overhead_bytes
    assert bf16.capacity.kv_budget_bytes == budget
    assert bf16.capacity.sequences == (budget // (2 * MIB) - 1) // 256 > 0  # 2 MiB blocks, 256 per sequence
    assert fp8.capacity.sequences > bf16.capacity.sequences
    fp8_kv = plans_by_key(spec, snapshot, context=4096, kv_dtype="fp8")["bf16"].capacity
    assert fp8_kv.sequences >= 2 * bf16.capacity.sequences
    assert plans_by_key(spec, None)["bf16"].capacity.sequences is None  # no telemetry, no figure


def test_plan_json_and_text_carry_capacity(capsys):
    assert main(["plan", "default", "--simulate", "gb10", "--json", "--context", "8192"]) == 0
    plans = {p["precision"]: p for p in json.loads(capsys.readouterr().out)["plans"]}
    for plan in plans.values():
        cap = plan["capacity"]
        assert set(cap) == {"sequences", "context", "kv_dtype", "kv_bytes_per_sequence", "kv_budget_bytes", "rule",
                            "limit"}
        assert cap["context"] == 8192 and cap["sequences"] >= 1
    assert plans["bf16"]["capacity"]["rule"].startswith("vLLM: 16-token blocks")
    assert plans["q4_k_m"]["capacity"]["rule"].startswith("llama.cpp: --parallel N")
    assert main(["plan", "default", "--simulate", "gb10", "--context", "8192", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "SEQS @ 8192" in out and f"{plans['bf16']['capacity']['sequences']:,} seq" in out
