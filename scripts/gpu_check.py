"""The first time a GPU is at hand: do qexplorer's GPU figures agree with the driver and with themselves?

    python scripts/gpu_check.py [--data-dir DIR] [--skip-jobs]

1. NVML as qexplorer reads it against ``nvidia-smi``: device name, total / used
   memory on a discrete card; on unified memory (GB10) that the GPU figure is
   the sum of the per-process allocations ``nvidia-smi`` lists, where
   ``nvidia-smi``'s own memory column is blank.
2. A 1 B-shaped random-weight Llama built from a config (no download), run as
   ``qexplorer run`` runs it - bf16, fp8, int4 (W4A16) and nvfp4a16, vLLM when
   it is installed, else the labelled transformers fallback: decode tok/s, % of
   the roofline, the job's peak GPU memory against the plan.
3. vLLM as served (issue 23): a transformers fallback while vLLM is installed is
   a contradiction (its start-up check or a flag failed: the reason is printed);
   so is a label that disagrees with the kernel lines in vLLM's own log, a dtype
   other than the precision's, no CUDA-graph capture in the log, and a kernel
   other than the one the plan expected.

Prints one table and exits 1 on a contradiction (figures that disagree, a
roofline above 100 %, a GPU peak far off its plan, a job that fails). Without a
GPU it says so in one sentence and exits 0.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PLAN_TOLERANCE = 0.25  # a GPU peak more than 25 % off its plan is a contradiction
MEMORY_TOLERANCE = 0.05  # NVML vs nvidia-smi, sampled a moment apart
PRECISIONS = ("bf16", "fp8", "int4_rtn", "nvfp4a16")
MIB = 1024**2


@dataclass(frozen=True)
class Check:
    name: str
    expected: str
    measured: str
    ok: bool


def nvidia_smi(query: str, kind: str = "gpu") -> list[list[str]]:
    if shutil.which("nvidia-smi") is None:
        return []
    flag = "--query-gpu" if kind == "gpu" else "--query-compute-apps"
    out = subprocess.run(["nvidia-smi", f"{flag}={query}", "--format=csv,noheader,nounits"], capture_output=True,
                         text=True, timeout=30)
    return [[cell.strip() for cell in line.split(",")] for line in out.stdout.splitlines() if line.strip()]


def number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def telemetry_checks(snapshot) -> list[Check]:
    checks = []
    rows = nvidia_smi("name,memory.total,memory.used")
    apps = nvidia_smi("pid,used_memory", kind="apps")
    for device, row in zip(snapshot.devices, rows, strict=False):
        name, total, used = row[0], number(row[1]), number(row[2])
        checks.append(Check(f"GPU {device.index} name", name, device.name, name == device.name))
        if device.unified:
            listed = sum(number(a[1]) or 0 for a in apps) * MIB
            ours = device.gpu_used_bytes.value
            ok = ours is not None and abs(ours - listed) <= max(MEMORY_TOLERANCE * listed, 256 * MIB)
            checks.append(Check(f"GPU {device.index} used (unified: Σ processes)", f"{listed / MIB:.0f} MiB "
                                f"(nvidia-smi apps; its memory.used says {row[2]})",
                                "n/a" if ours is None else f"{ours / MIB:.0f} MiB", ok))
            checks.append(Check(f"GPU {device.index} headroom", "MemAvailable − reserve",
                                device.headroom_bytes.text(), device.headroom_bytes.note == "MemAvailable − reserve"))
        else:
            for label, smi, ours in (("total", total, device.memory_total_bytes.value),
                                     ("used", used, device.gpu_used_bytes.value)):
                ok = smi is not None and ours is not None and abs(ours / MIB - smi) <= max(MEMORY_TOLERANCE * smi, 64)
                checks.append(Check(f"GPU {device.index} memory {label}", f"{smi} MiB (nvidia-smi)",
                                    "n/a" if ours is None else f"{ours / MIB:.0f} MiB", ok))
    if not rows:
        checks.append(Check("nvidia-smi", "present", "not found on PATH", True))
    return checks


def missing_producer(precision: str) -> str | None:
    """The library that makes this precision's artifact, when it is not installed (then the job is skipped)."""
    from importlib.util import find_spec

    from qexplorer.core.kinds import Producer
    from qexplorer.core.precisions import get

    if get(precision).producer == Producer.LLMCOMPRESSOR and find_spec("llmcompressor") is None:
        return "llm-compressor"
    return None


def job_checks(folder: Path, data_dir: Path) -> list[Check]:
    from qexplorer.core.catalog import Catalog
    from qexplorer.core.device import local_device
    from qexplorer.core.domain.bench import BenchConfig
    from qexplorer.core.domain.spec import JobSpec
    from qexplorer.core.jobs.runner import JobRunner
    from qexplorer.core.precisions import get
    from qexplorer.core.session import plan_jobs
    from qexplorer.core.settings import engine_env, load_settings
    from qexplorer.core.telemetry import local_sampler

    spec = Catalog(extra_paths=(str(folder),)).resolve(str(folder))
    sampler = local_sampler()
    template = JobSpec(model_ref=str(folder), precision="", data_dir=str(data_dir), bench=BenchConfig.quick(),
                       model_paths=(str(folder),))
    planned = plan_jobs(spec, [get(k) for k in PRECISIONS], sampler.sample(), template, force=True)
    runner = JobRunner(sampler=sampler, interval_s=0.25, extra_env=engine_env(load_settings()))
    checks = []
    for job in planned.specs:
        missing = missing_producer(job.precision)
        if missing:
            checks.append(Check(f"{job.precision} job", "ok", f"skipped: {missing} is not installed", True))
            continue
        outcome = runner.run(job)
        record = outcome.record
        if record is None or record.speed is None:
            checks.append(Check(f"{job.precision} job", "ok", f"{outcome.status}: {outcome.error}", False))
            continue
        engine = f"{record.engine.name} ({record.engine.mode})"
        tg = record.speed.decode_tok_s
        checks.append(Check(f"{job.precision} decode, {engine}", "> 0 tok/s", f"{tg.mean:.1f} ± {tg.sd:.1f} tok/s",
                            tg.mean > 0))
        roof = record.roofline_pct
        checks.append(Check(f"{job.precision} roofline ({record.hardware.bandwidth_source})", "≤ 100 %",
                            "n/a" if roof is None else f"{roof:.0f} %", roof is not None and roof <= 100))
        checks += served_checks(job.precision, record, data_dir, local_device().compute_capability)
        plan = record.memory.plan_check(record.hardware.gpu_unified)
        error = plan.error_pct
        checks.append(Check(f"{job.precision} peak {plan.term} vs plan",
                            "n/a" if plan.planned_bytes is None else f"{plan.planned_bytes / MIB:.0f} MiB planned",
                            "n/a" if plan.measured_bytes is None else
                            f"{plan.measured_bytes / MIB:.0f} MiB ({error:+.0f} %)" if error is not None else "n/a",
                            error is not None and abs(error) <= 100 * PLAN_TOLERANCE))
    sampler.close()
    return checks


def served_checks(precision_key: str, record, data_dir: Path, compute_capability: tuple[int, int] | None
                  ) -> list[Check]:
    """vLLM as the job served it, against vLLM's own log and the plan's label for this GPU (issue 23)."""
    from qexplorer.core.engines.vllm import find_vllm
    from qexplorer.core.kinds import Engine
    from qexplorer.core.precisions import get
    from qexplorer.core.serving.vllm_kernels import mismatch, mode_of, parse_log, served_dtype
    from qexplorer.core.serving.vllm_launch import dtype_for

    precision, engine = get(precision_key), record.engine
    if engine.is_fallback:
        installed = find_vllm() is not None
        return [Check(f"{precision_key} served by vLLM", "vLLM" if installed else "vLLM (not installed)",
                      f"transformers fallback: {engine.fallback_reason}", not installed)]
    if engine.name != Engine.VLLM:
        return []
    logs = sorted((data_dir / "logs").glob(f"vllm-{precision_key}-*.log"))
    log = logs[-1].read_text(encoding="utf-8", errors="replace") if logs else ""
    from qexplorer.core.precisions import Hardware

    planned = precision.support(Hardware(cuda=True, compute_capability=compute_capability)).mode
    from_log = mode_of(parse_log(log, "cuda"), planned, precision)
    differs = mismatch(engine.expected_kernel, engine.kernel)
    return [
        Check(f"{precision_key} label: plan vs vLLM's log", f"{planned} (the plan, CC {compute_capability})",
              f"{from_log} from the log; the row says {engine.mode}", planned == from_log == engine.mode),
        Check(f"{precision_key} dtype", dtype_for(precision), served_dtype(log) or "not in the log",
              served_dtype(log) == dtype_for(precision)),
        Check(f"{precision_key} CUDA graphs", "captured (no --enforce-eager)",
              "captured" if "Graph capturing finished" in log else "no capture in the log",
              "Graph capturing finished" in log and "--enforce-eager" not in engine.serve_command),
        Check(f"{precision_key} kernel vs plan", engine.expected_kernel or "?", differs or "as planned",
              differs is None),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="where the artifacts go (default: a temporary folder)")
    parser.add_argument("--skip-jobs", action="store_true", help="only compare NVML with nvidia-smi")
    parser.add_argument("--tokenizer", help="a tokenizer folder for the random model (default: the bundled model's)")
    args = parser.parse_args()
    from qexplorer.core.telemetry import local_sampler

    sampler = local_sampler()
    snapshot = sampler.sample()
    sampler.close()
    if not snapshot.devices:
        print(f"No GPU here ({snapshot.nvml_status}): nothing to check.")
        return 0
    checks = telemetry_checks(snapshot)
    if not args.skip_jobs:
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = Path(args.data_dir) if args.data_dir else Path(tmp)
            try:
                from synthetic import build

                folder = build("llama-1b", Path(tmp) / "llama-1b-random", data_dir,
                               Path(args.tokenizer) if args.tokenizer else None)
                checks += job_checks(folder, data_dir)
            except ImportError as exc:
                checks.append(Check("jobs", "torch + transformers installed", f"missing: {exc.name}", False))
    width = max(len(c.name) for c in checks)
    print(f"{'check':{width}}  {'expected':40}  {'measured':28}  verdict")
    for c in checks:
        print(f"{c.name:{width}}  {c.expected:40}  {c.measured:28}  {'ok' if c.ok else 'CONTRADICTION'}")
    bad = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(bad)} of {len(checks)} agree" + (f"; {len(bad)} contradictions" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
