"""Benchmarks for jobs: the llama.cpp backend against llama-bench, and the
planner's predicted peak against the measured peak for every precision.

    python scripts/bench_jobs.py backend --llama-bench PATH [--precision q8_0,q4_k_m] [--depth 0,2048]
                                         [--reps 5] [--rounds 3] [--threads 2]
    python scripts/bench_jobs.py peaks [--model default] [--precision all] [--quick] [--quality]
    python scripts/bench_jobs.py shapes [--shapes dense-185m,moe-small] [--quick] [--quality]
                                        # the same on random-weight models of other shapes
    python scripts/bench_jobs.py decision [--precision bf16,int8,q8_0,q4_k_m] [--data-dir DIR]
                                        # time to decision, cold then warm, estimated vs actual per job
    python scripts/bench_jobs.py scale [--shapes dense-185m,llama-0.5b,llama-1b] [--precision ...] [--quick]
                                        # per size and phase: measured vs the ETA, peak vs the plan, and the
                                        # exponent of each phase's time against the model's size

Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from qexplorer.core import precisions
from qexplorer.core.bench import llamacpp_timer
from qexplorer.core.catalog import Catalog
from qexplorer.core.domain.bench import BenchConfig
from qexplorer.core.domain.events import drive
from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.jobs.runner import JobRunner
from qexplorer.core.quantize.torch_quant import CALIBRATION_FILE


def _artifacts(tmp: str, keys: list[str]) -> dict[str, Path]:
    """The .gguf files qexplorer serves for these precisions of the bundled model (built by a quick job)."""
    runner = JobRunner(interval_s=0.5)
    found = {}
    for key in keys:
        outcome = runner.run(JobSpec(model_ref="default", precision=key, data_dir=tmp, bench=BenchConfig.quick()))
        found[key] = Path(outcome.record.engine.artifact_path)
    return found


def _llama_bench(binary: str, path: Path, config: BenchConfig) -> dict[tuple[str, int], tuple[float, float]]:
    """llama-bench's own pp / tg (mean, sd) per depth, from its JSON output."""
    import json
    import subprocess

    command = [binary, "-m", str(path), "-t", str(config.threads), "-p", str(config.prompt_tokens),
               "-n", str(config.gen_tokens), "-r", str(config.repetitions), "-ngl", "0", "-o", "json",
               "-d", ",".join(str(d) for d in config.depths)]
    rows = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    return {("pp" if row["n_prompt"] else "tg", int(row.get("n_depth", 0))): (row["avg_ts"], row["stddev_ts"])
            for row in rows}


def backend(args: argparse.Namespace) -> None:
    """qexplorer's llama.cpp backend against llama-bench (built from the same vendored llama.cpp), same file, threads
    and shape, in alternating rounds so that drift hits both alike."""
    config = BenchConfig(prompt_tokens=args.pp, gen_tokens=args.tg, repetitions=args.reps, threads=args.threads,
                         depths=tuple(int(d) for d in args.depth.split(",")),
                         min_repetitions=args.reps)  # llama-bench's fixed count on both sides
    text = CALIBRATION_FILE.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        files = _artifacts(tmp, args.precision.split(","))
        print(f"{args.threads} threads, pp{args.pp} / tg{args.tg}, {args.reps} repetitions, depths {args.depth}, "
              f"{args.rounds} alternating rounds; tok/s mean over rounds")
        print(f"{'file':28} {'test':>12} {'qexplorer':>16} {'llama-bench':>16} {'ratio':>6}  noisy rounds")
        for path in files.values():
            llm = llamacpp_timer.load(path, config, n_gpu_layers=0)
            ours: dict[tuple[str, int], list[float]] = {}
            theirs: dict[tuple[str, int], list[float]] = {}
            noisy = 0
            for _ in range(args.rounds):
                for speed in drive(llamacpp_timer.run(llm, text, config)):
                    ours.setdefault(("pp", speed.depth), []).append(speed.prefill_tok_s.mean)
                    ours.setdefault(("tg", speed.depth), []).append(speed.decode_tok_s.mean)
                    noisy += speed.noisy
                    if speed.noisy:
                        print(f"  noisy round: {speed.noise.reason}", flush=True)
                for test, (mean, _spread) in _llama_bench(args.llama_bench, path, config).items():
                    theirs.setdefault(test, []).append(mean)
            del llm
            for test in sorted(ours, key=lambda t: (t[1], t[0])):
                name = f"{test[0]}{args.pp if test[0] == 'pp' else args.tg}" + (f" @ d{test[1]}" if test[1] else "")
                a, b = ours[test], theirs.get(test, [float("nan")])
                print(f"{path.name:28} {name:>12} {statistics.fmean(a):8.1f} ± {_sd(a):5.1f} "
                      f"{statistics.fmean(b):8.1f} ± {_sd(b):5.1f} {statistics.fmean(a) / statistics.fmean(b):6.3f}  "
                      f"{noisy}", flush=True)


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def served(args: argparse.Namespace) -> None:
    """Decode tok/s at concurrency 1: llama-cpp-python's server vs the local llama.cpp backend, same file."""
    import socket
    import subprocess
    import sys

    from qexplorer.core import server
    from qexplorer.core.catalog import bundled_model_path

    path = bundled_model_path()
    config = BenchConfig(prompt_tokens=64, gen_tokens=128, repetitions=args.reps, threads=args.threads)
    local = drive(llamacpp_timer.run(llamacpp_timer.load(path, config, n_gpu_layers=0), CALIBRATION_FILE.read_text(),
                               config))[0].decode_tok_s
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--port", str(port),
                             "--n_threads", str(args.threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        target = server.ServerTarget(f"http://127.0.0.1:{port}", timeout_s=60)
        for _ in range(100):
            try:
                server.discover_model(target)
                break
            except server.ServerError:
                time.sleep(0.3)
        result = drive(server.sweep(target, (1,), args.reps, 128))
    finally:
        proc.terminate()
    served_tg = result.levels[0].decode_tok_s_per_stream
    print(f"{path.name}, {args.threads} threads, 128 generated tokens, {args.reps} repetitions")
    print(f"  local llama.cpp backend (tg128)      {local.mean:7.1f} ± {local.sd:5.1f} tok/s")
    print(f"  llama-cpp-python server, conc. 1     {served_tg.mean:7.1f} ± {served_tg.sd:5.1f} tok/s per stream")
    print(f"  ratio served / local: {served_tg.mean / local.mean:.3f}")


def peaks_by_phase(outcome) -> dict[str, int]:
    """The highest sample of each phase, in bytes, in the order the phases ran."""
    found: dict[str, int] = {}
    for sample in outcome.memory:
        found[sample.phase] = max(found.get(sample.phase, 0), sample.rss_bytes + (sample.gpu_bytes or 0))
    return found


def phase_peaks(outcome) -> str:
    """The highest sample of each phase, in MiB, in the order the phases ran."""
    return " ".join(f"{name}={value / 2**20:.0f}" for name, value in peaks_by_phase(outcome).items())


def peaks(args: argparse.Namespace, model_ref: str | None = None, extra_paths: tuple[str, ...] = ()) -> None:
    """Planned vs measured job peak for each precision, as ``qexplorer run`` plans and runs them: one fresh data
    dir, the jobs in the order given (so the first quality job builds the reference and the rest reuse it)."""
    from qexplorer.core.session import plan_jobs
    from qexplorer.core.telemetry import local_sampler

    model_ref = model_ref or args.model
    spec = Catalog(extra_paths=extra_paths).resolve(model_ref)
    chosen = precisions.parse_list(args.precision)
    bench = BenchConfig.quick() if args.quick else BenchConfig(repetitions=1)
    print(f"{spec.name}: {spec.total_params / 1e6:.1f} M parameters ({spec.active_params / 1e6:.1f} M active); "
          f"pp{bench.prompt_tokens}/tg{bench.gen_tokens}; quality {'on' if args.quality else 'off'}")
    print(f"{'precision':10} {'planned':>10} {'measured':>10} {'error':>7}  status  [peak per phase, MiB]")
    with tempfile.TemporaryDirectory() as tmp:
        runner = JobRunner(interval_s=0.25)
        template = JobSpec(model_ref=model_ref, precision="", data_dir=tmp, bench=bench, model_paths=extra_paths,
                           quality=args.quality, quality_tokens=args.quality_tokens)
        for job in plan_jobs(spec, chosen, local_sampler().sample(), template, force=True).specs:
            outcome = runner.run(job)
            check = (outcome.record.memory if outcome.record else None)
            measured = check.plan_check(None).measured_bytes if check else outcome.peak_rss_bytes
            predicted = job.planned_peak_bytes or 0
            error = 100 * (predicted / measured - 1) if measured else float("nan")
            print(f"{job.precision:10} {predicted / 2**20:8.0f} MiB {measured / 2**20:8.0f} MiB {error:+6.1f} %  "
                  f"{outcome.status} {outcome.error or ''} [{phase_peaks(outcome)}]", flush=True)


def shapes(args: argparse.Namespace) -> None:
    """The same planned-vs-measured table on random-weight models of other shapes (scripts/synthetic.py)."""
    from synthetic import build

    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            folder = build(shape, Path(tmp) / shape, Path(tmp) / "data")
            peaks(args, model_ref=str(folder), extra_paths=(str(folder),))


def decision(args: argparse.Namespace) -> None:
    """Time to decision: the app's default ladder with quality, from an empty data directory (cold), then again
    with everything cached (warm), through `qexplorer run` as a user runs it; per job the phases it spent time in,
    the estimate it was given beforehand, whether it was reused or overlapped, and when each answer arrived."""
    import json
    import os
    import subprocess
    import sys
    import threading

    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="qexplorer-decision-"))
    env = {**os.environ, "QEXPLORER_DATA_DIR": str(data_dir)}
    command = [sys.executable, "-m", "qexplorer", "run", "default", "--precision", args.precision, "--quality",
               "--json", *(["--quick"] if args.quick else []), *(["--one-at-a-time"] if args.one_at_a_time else [])]
    print(f"{' '.join(command[2:])}  (data dir {data_dir})")
    for run in ("cold", "warm"):
        began = time.time()
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        answers: list[tuple[float, str]] = []
        err_lines: list[str] = []

        def read_stderr(proc: subprocess.Popen[str], started: float, err_lines: list[str],
                        answers: list[tuple[float, str]]) -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                err_lines.append(line)
                if " done" in line and line.startswith("["):  # "[2/8] q8_0 (quick) done: ..."
                    answers.append((time.perf_counter() - started, line.split("]", 1)[1].split(" done")[0].strip()))

        reader = threading.Thread(target=read_stderr, args=(proc, started, err_lines, answers))
        reader.start()
        out = proc.stdout.read() if proc.stdout else ""
        proc.wait()
        reader.join()
        wall = time.perf_counter() - started
        jobs = json.loads(out)["jobs"] if out.strip() else []
        book = [j for j in json.loads((data_dir / "durations.json").read_text())["jobs"]
                if j["at"] >= int(began)] if (data_dir / "durations.json").exists() else []
        timed = {entry["precision"] + (" (quick)" if entry.get("first_pass") else ""): entry for entry in book}
        quick_at = [at for at, name in answers if name.endswith("(quick)")]
        full_at = [at for at, name in answers if not name.endswith("(quick)")]
        print(f"\n{run}: {wall:.1f} s to the last result (exit {proc.returncode}); answers at "
              + ", ".join(f"{name} {at:.1f} s" for at, name in answers))
        if quick_at:
            print(f"  every precision answered (quick) by {max(quick_at):.1f} s; full figures from "
                  f"{min(full_at, default=float('nan')):.1f} s to {max(full_at, default=float('nan')):.1f} s")
        print(f"  {'job':15} {'estimated':>10} {'actual':>8}  phases (s)")
        for job in jobs:
            name = job["precision"] + (" (quick)" if job.get("first_pass") else "")
            result = job.get("result") or {}
            if result.get("reused_from"):
                print(f"  {name:15} reused result #{result['reused_from']} (measured {result['reused_measured_at']})")
                continue
            entry = timed.get(name)
            phases = ", ".join(f"{p} {sec:.1f}" for p, sec in entry["phases"]) if entry else "?"
            paused = result.get("paused_for_timing") or []
            shared = result.get("shared_phases") or []
            print(f"  {name:15} {entry['predicted_s'] if entry else float('nan'):>9.1f}s "
                  f"{entry['actual_s'] if entry else float('nan'):>7.1f}s  {phases}"
                  f"  [{entry['source'] if entry else ''}]"
                  + (f" paused {','.join(paused)} while timed" if paused else "")
                  + (f"; beside another job in: {', '.join(shared)}" if shared else ""))
        if proc.returncode:
            print("".join(err_lines)[-2000:])


def scale(args: argparse.Namespace) -> None:
    """How each phase's time and the job's memory grow with the model: the ladder with quality, cold (a fresh data
    directory per size), on random-weight models built from configs. Per size and phase: measured seconds, the
    ETA's prediction and its error; per job: measured peak against the planner's. Then per phase the exponent b
    of seconds ∝ parameters^b over the sizes (a least-squares line in log-log; 1.0 is linear in the weights)."""
    import json
    import math

    from synthetic import build

    from qexplorer.core.eta import estimate_jobs
    from qexplorer.core.session import plan_jobs
    from qexplorer.core.telemetry import local_sampler

    bench = BenchConfig.quick() if args.quick else BenchConfig()
    chosen = precisions.parse_list(args.precision)
    times: dict[str, list[tuple[float, float]]] = {}  # phase → (parameters, seconds), summed over the ladder
    points: list[dict[str, object]] = []  # every job's phases, units and seconds: the points a rate is fitted on
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = None
        for shape in args.shapes.split(","):
            data_dir = Path(tmp) / f"data-{shape}"
            if shape == "default":  # the bundled GGUF itself: its jobs dequantize it first
                ref, paths = "default", ()
            else:
                folder = build(shape, Path(tmp) / shape, data_dir, tokenizer)
                tokenizer = tokenizer or folder  # the bundled tokenizer, made once
                ref, paths = str(folder), (str(folder),)
            spec = Catalog(extra_paths=paths).resolve(ref)
            template = JobSpec(model_ref=ref, precision="", data_dir=str(data_dir), bench=bench,
                               model_paths=paths, quality=True, quality_tokens=args.quality_tokens)
            jobs = plan_jobs(spec, chosen, local_sampler().sample(), template, force=True).specs
            estimates = {e.precision: e for e in estimate_jobs(spec, jobs, data_dir)}
            print(f"\n{shape}: {spec.total_params / 1e9:.2f} B parameters ({spec.active_params / 1e9:.2f} B active), "
                  f"{bench.describe()}, quality on, cold")
            print(f"  {'job':9} {'phase':10} {'measured':>9} {'ETA':>8} {'error':>7}")
            per_phase: dict[str, float] = {}
            runner = JobRunner(interval_s=0.25)
            for job in jobs:
                outcome = runner.run(job)
                predicted: dict[str, float] = {}
                for part in estimates[job.precision].phases:
                    predicted[part.name] = predicted.get(part.name, 0.0) + part.seconds
                for name, seconds in outcome.phase_seconds:
                    per_phase[name] = per_phase.get(name, 0.0) + seconds
                    eta = predicted.get(name)
                    error = f"{100 * (eta / seconds - 1):+6.0f} %" if eta and seconds > 0.5 else "   n/a"
                    print(f"  {job.precision:9} {name:10} {seconds:8.1f}s {eta or 0:7.1f}s {error}")
                check = outcome.record.memory.plan_check(None) if outcome.record else None
                measured = check.measured_bytes if check else outcome.peak_rss_bytes
                planned = job.planned_peak_bytes or 0
                points.append({"shape": shape, "params": spec.total_params, "active": spec.active_params,
                               "precision": job.precision, "status": str(outcome.status),
                               "estimate": [[p.name, p.key, p.units, p.seconds]
                                            for p in estimates[job.precision].phases],
                               "measured": [[name, seconds] for name, seconds in outcome.phase_seconds],
                               "peak_bytes": measured, "planned_bytes": planned,
                               "phase_peaks": peaks_by_phase(outcome)})
                if args.points:  # after every job, so that a run cut short keeps what it measured
                    Path(args.points).write_text(json.dumps(points, indent=1), encoding="utf-8")
                error = 100 * (planned / measured - 1) if measured else float("nan")
                total_eta = estimates[job.precision].total_s
                actual = sum(s for _, s in outcome.phase_seconds)
                print(f"  {job.precision:9} {'TOTAL':10} {actual:8.1f}s {total_eta:7.1f}s "
                      f"{100 * (total_eta / actual - 1) if actual else float('nan'):+6.0f} %   peak "
                      f"{measured / 2**20 if measured else 0:.0f} MiB, planned {planned / 2**20:.0f} MiB "
                      f"({error:+.0f} %) {outcome.status} {outcome.error or ''} [{phase_peaks(outcome)}]", flush=True)
            for name, seconds in per_phase.items():
                times.setdefault(name, []).append((float(spec.total_params), seconds))
    print("\nexponent of time against parameters, per phase (1.0: linear in the weights)")
    for name, sized in times.items():
        sized = [(n, t) for n, t in sized if t > 0.2]
        if len(sized) < 2:
            print(f"  {name:10} n/a (fewer than two sizes with a measurable time)")
            continue
        xs, ys = [math.log(n) for n, _ in sized], [math.log(t) for _, t in sized]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        print(f"  {name:10} {slope:5.2f}   points: " + ", ".join(f"{n / 1e9:.2f} B {t:.1f} s" for n, t in sized))


def fit(args: argparse.Namespace) -> None:
    """The ETA's default costs from the scale benchmark's points (``scale --points``): per phase key, the
    least-squares line seconds = fixed + per unit × units over every job that ran it (both parts kept ≥ 0), its
    points and each point's error; printed ready to paste into ``eta.DEFAULT_COSTS``."""
    import json

    from qexplorer.core.eta import DEFAULT_COSTS

    points: dict[str, list[tuple[float, float, str]]] = {}
    for path in args.points:
        for job in json.loads(Path(path).read_text(encoding="utf-8")):
            if job["status"] != "ok":
                continue
            keys: dict[str, list[tuple[str, float]]] = {}
            for name, key, units, _seconds in job["estimate"]:
                keys.setdefault(name, []).append((key, units))
            spent: dict[str, float] = {}
            for name, seconds in job["measured"]:
                spent[name] = spent.get(name, 0.0) + seconds
            for name, seconds in spent.items():
                if len(keys.get(name, ())) == 1:  # a name two estimates share cannot be told apart
                    key, units = keys[name][0]
                    points.setdefault(key, []).append((units, seconds, f"{job['shape']}/{job['precision']}"))
    for key, found in sorted(points.items()):
        xs, ys = [u for u, _, _ in found], [t for _, t, _ in found]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        spread = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / spread if spread > 0 else 0.0
        fixed = my - slope * mx
        if slope <= 0 or spread <= 0:  # one size, or no growth: all fixed
            slope, fixed = 0.0, my
        elif fixed < 0:  # no fixed part: the line through zero
            slope, fixed = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs), 0.0
        old = DEFAULT_COSTS.get(key)
        print(f"{key:45} fixed {fixed:8.3f} s  per unit {slope:10.5f} s   (was {old.fixed_s if old else 0:.3f} / "
              f"{old.per_unit_s if old else 0:.5f})")
        for units, seconds, where in found:
            predicted = fixed + slope * units
            print(f"    {where:22} units {units:10.4f}  measured {seconds:7.1f} s  fit {predicted:7.1f} s "
                  f"({100 * (predicted / seconds - 1) if seconds > 0 else 0:+.0f} %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("backend")
    b.add_argument("--llama-bench", required=True, help="llama-bench built from llama-cpp-python's vendored llama.cpp")
    b.add_argument("--precision", default="q8_0,q4_k_m")
    b.add_argument("--pp", type=int, default=512)
    b.add_argument("--tg", type=int, default=128)
    b.add_argument("--depth", default="0")
    b.add_argument("--reps", type=int, default=5)
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("peaks")
    p.add_argument("--model", default="default")
    p.add_argument("--precision", default="all")
    v = sub.add_parser("served")
    v.add_argument("--reps", type=int, default=5)
    v.add_argument("--threads", type=int, default=2)
    s = sub.add_parser("shapes")
    s.add_argument("--shapes", default="dense-185m,moe-small")
    s.add_argument("--precision", default="bf16,int8,int4_rtn,fp8,q8_0,q4_k_m")
    for parser_ in (p, s):
        parser_.add_argument("--quick", action="store_true")
        parser_.add_argument("--quality", action="store_true")
        parser_.add_argument("--quality-tokens", type=int, default=4096)
    d = sub.add_parser("decision")
    d.add_argument("--precision", default="bf16,int8,q8_0,q4_k_m")
    d.add_argument("--data-dir", help="default: a new empty folder")
    d.add_argument("--quick", action="store_true")
    d.add_argument("--one-at-a-time", action="store_true", help="no overlap of untimed work (to compare)")
    c = sub.add_parser("scale")
    c.add_argument("--shapes", default="dense-185m,llama-0.5b,llama-1b")
    c.add_argument("--precision", default="bf16,int8,q8_0,q4_k_m")
    c.add_argument("--quick", action="store_true")
    c.add_argument("--quality-tokens", type=int, default=4096)
    c.add_argument("--points", help="write every job's phases (units, seconds, estimate) to this JSON file")
    f = sub.add_parser("fit")
    f.add_argument("points", nargs="+", help="files written by scale --points")
    args = parser.parse_args()
    {"backend": backend, "peaks": peaks, "shapes": shapes, "served": served, "decision": decision,
     "scale": scale, "fit": fit}[args.what](args)


if __name__ == "__main__":
    main()
