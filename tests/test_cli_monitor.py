"""`qexplorer monitor --once --json`: schema, units, and agreement with /proc/meminfo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qexplorer.cli import main
from qexplorer.core.procfs import read_meminfo


def run_json(capsys, *args: str) -> dict:
    assert main(["monitor", "--once", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def assert_reading(obj: dict) -> None:
    assert set(obj) == {"value", "source", "note"}
    assert obj["value"] is None or isinstance(obj["value"], (int, float))
    if obj["value"] is None:
        assert obj["source"] == "unavailable"


def test_schema_on_gb10_profile(capsys):
    data = run_json(capsys, "--simulate", "gb10")
    assert data["schema"] == "qexplorer.telemetry/1"
    assert data["simulated"] == "gb10" and data["unified"] is True
    for reading in data["host"].values():
        assert_reading(reading)
    device = data["devices"][0]
    for key in ("memory_total_bytes", "gpu_used_bytes", "headroom_bytes", "optimistic_headroom_bytes",
                "other_host_bytes", "utilization_pct", "temperature_c", "power_w", "sm_clock_mhz"):
        assert_reading(device[key])
    # bytes are integers
    assert isinstance(device["gpu_used_bytes"]["value"], int)
    assert device["gpu_used_bytes"]["value"] == sum(p["gpu_bytes"] or 0 for p in data["processes"])
    assert device["headroom_bytes"]["value"] == data["host"]["available_bytes"]["value"] - data["reserve_bytes"]
    for proc in data["processes"]:
        assert set(proc) == {"pid", "name", "gpu_bytes", "rss_bytes", "own_job"}


def test_reserve_flag_changes_headroom(capsys):
    data = run_json(capsys, "--simulate", "gb10", "--reserve-gib", "4")
    assert data["reserve_bytes"] == 4 * 1024**3


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="Linux only")
def test_this_machine_matches_meminfo(capsys):
    data = run_json(capsys)
    meminfo = read_meminfo("/proc/meminfo", ["MemTotal", "MemAvailable"])
    assert data["simulated"] is None
    assert data["host"]["total_bytes"]["value"] == meminfo["MemTotal"]
    available = data["host"]["available_bytes"]["value"]
    assert abs(available - meminfo["MemAvailable"]) <= 0.10 * meminfo["MemAvailable"]
    if not data["devices"]:
        assert data["nvml_status"]  # says plainly why there is no GPU


def test_text_output_says_no_gpu_plainly(capsys):
    assert main(["monitor", "--once", "--simulate", "none"]) == 0
    out = capsys.readouterr().out
    assert "GPU: none (no NVIDIA driver library" in out
    assert "SIMULATED" in out


def test_bad_setting_is_one_sentence_and_exit_2(capsys):
    assert main(["monitor", "--once", "--refresh", "99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qexplorer: refresh_s in the command line is 99.0") and err.count("\n") == 1


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "qexplorer", "monitor", "--once", "--json", "--simulate", "h100"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads(out)["devices"][0]["name"] == "NVIDIA H100 80GB HBM3"
