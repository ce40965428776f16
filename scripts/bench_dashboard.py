"""Benchmark the dashboard: sampler latency, idle CPU, time to first frame, and the app's own CPU while a
job it started is timed.

    python scripts/bench_dashboard.py [--idle-s 20] [--runs 5]
    python scripts/bench_dashboard.py --job q4_k_m     # the app while it measures, beside the CLI

Prints numbers; asserts nothing (targets: poll median ≤ 5 ms, idle CPU ≤ 3 %
of one core at 1 Hz, first frame ≤ 1.5× a bare Textual app with a header and a
footer, both measured here in the same run; while a job is timed, the decode
measured from the app is within the spread of the CLI's, and the app's own CPU
- the headless driver's 5 Hz polling included - is printed beside it).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import textwrap
import time

FIRST_FRAME = """
import time, sys
t0 = time.perf_counter()
{imports}
async def main():
    app = {make}
    # run_test returns once the app is ready: first screen mounted and painted.
    async with app.run_test(size=(80, 24)):
        print(time.perf_counter() - t0)
import asyncio
asyncio.run(main())
"""
BARE = FIRST_FRAME.format(
    imports=textwrap.dedent("""
        from textual.app import App
        from textual.widgets import Header, Footer
        class Bare(App):
            def compose(self):
                yield Header()
                yield Footer()
    """),
    make="Bare()",
)
QEXPLORER = FIRST_FRAME.format(
    imports=textwrap.dedent("""
        from qexplorer.core.settings import Settings
        from qexplorer.ui.app import make_app
        from qexplorer.ui.sources import Sources
    """),
    make="make_app(Settings(), Sources.for_profile(None, Settings()))",
)


def first_frame_s(code: str, runs: int) -> list[float]:
    """Interpreter start to first frame; interpreter start-up measured apart and added."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        interpreter_s = time.perf_counter() - start
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        times.append(interpreter_s + float(out.split()[-1]))
    return times


def poll_latency_ms(samples: int, walk_processes: bool = False) -> list[float]:
    from qexplorer.core.telemetry import local_sampler

    sampler = local_sampler()
    sampler.sample()  # NVML init and the first process walk are one-off costs
    times = []
    for _ in range(samples):
        if walk_processes:  # defeat the 5 s cache of the host process table
            sampler.host._last_top_at = 0.0  # type: ignore[attr-defined]
        start = time.perf_counter()
        sampler.sample()
        times.append((time.perf_counter() - start) * 1000)
    sampler.close()
    return times


def idle_cpu_pct(idle_s: float) -> float:
    code = textwrap.dedent(f"""
        import asyncio, resource
        from qexplorer.core.settings import Settings
        from qexplorer.ui.app import make_app
        from qexplorer.ui.sources import Sources

        async def main():
            app = make_app(Settings(refresh_s=1.0), Sources.for_profile(None, Settings()))
            async with app.run_test(size=(120, 40)) as pilot:
                await pilot.pause(1.0)
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                await asyncio.sleep({idle_s})
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
                print(100 * cpu / {idle_s}, len(app.history))
        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    pct, samples = out.split()
    print(f"  samples taken while idle: {samples}")
    return float(pct)


APP_JOB = """
import asyncio, json, resource, sys, time
from qexplorer.core.settings import Settings
from qexplorer.ui.app import make_app
from qexplorer.ui.sources import Sources

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

async def main():
    settings = Settings(refresh_s=1.0, results_dir=sys.argv[2])
    app = make_app(settings, Sources.for_profile(None, settings))
    async with app.run_test(size=(120, 40)) as pilot:
        while app.model is None:
            await pilot.pause(0.2)
        app.measure_quality = False
        app.remeasure = True
        app.chosen = frozenset([sys.argv[1]])
        app.queue_chosen()  # opens the jobs screen, as `r` on the plan screen does
        timed_cpu = timed_wall = 0.0
        start = None
        while True:
            await pilot.pause(0.2)
            jobs = app.jobs
            measuring = any(j.measuring_now for j in jobs)
            if measuring and start is None:
                start = (cpu(), time.monotonic())
            elif not measuring and start is not None:
                timed_cpu += cpu() - start[0]
                timed_wall += time.monotonic() - start[1]
                start = None
            if jobs and all(j.finished for j in jobs):
                break
        job = app.jobs[-1]
        speed = job.record.speed if job.record else None
        print(json.dumps({"status": str(job.status), "error": job.error, "timed_wall_s": timed_wall,
                          "app_cpu_pct": 100 * timed_cpu / timed_wall if timed_wall else None,
                          "decode": [speed.decode_tok_s.mean, speed.decode_tok_s.sd] if speed else None}))
asyncio.run(main())
"""


def app_while_timing(precision: str) -> None:
    """One job from the app (jobs screen open) and the same artifact from the CLI, one after the other."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as data_dir:
        out = subprocess.run([sys.executable, "-c", APP_JOB, precision, data_dir], check=True, capture_output=True,
                             text=True).stdout
        app = json.loads(out.strip().splitlines()[-1])
        import os

        cli = subprocess.run([sys.executable, "-m", "qexplorer", "run", "default", "--precision", precision,
                              "--remeasure", "--json"], check=True, capture_output=True, text=True,
                             env={**os.environ, "QEXPLORER_RESULTS_DIR": data_dir}).stdout
        result = json.loads(cli)["results"][0]
    print(f"{precision} from the app (jobs screen open): {app['status']}, decode "
          f"{app['decode'][0]:.1f} ± {app['decode'][1]:.1f} tok/s; the app used {app['app_cpu_pct']:.1f} % of one "
          f"core over the {app['timed_wall_s']:.0f} s it was timed")
    print(f"{precision} from the CLI:                   decode {result['tg_avg_ts']:.1f} ± "
          f"{result['tg_stddev_ts']:.1f} tok/s")


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f}, min {min(values):.2f}, max {max(values):.2f} (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--polls", type=int, default=200)
    parser.add_argument("--job", help="a precision to measure from the app and from the CLI (e.g. q4_k_m)")
    args = parser.parse_args()
    if args.job:
        app_while_timing(args.job)
        return

    polls = poll_latency_ms(args.polls)
    print(f"sampler poll latency, ms: {spread(polls)}; p95 {sorted(polls)[int(0.95 * len(polls))]:.2f}")
    walks = poll_latency_ms(max(10, args.polls // 10), walk_processes=True)
    print(f"  ... on the polls that also walk every process (every 5 s): {spread(walks)}")
    print(f"idle CPU on the dashboard at 1 Hz over {args.idle_s:g} s (headless driver):")
    print(f"  {idle_cpu_pct(args.idle_s):.2f} % of one core")
    bare = first_frame_s(BARE, args.runs)
    ours = first_frame_s(QEXPLORER, args.runs)
    print(f"time to first frame, s (process start to first frame, headless 80x24, {args.runs} runs):")
    print(f"  bare Textual app (header + footer): {spread(bare)}")
    print(f"  qexplorer dashboard:                {spread(ours)}")
    print(f"  ratio of medians: {statistics.median(ours) / statistics.median(bare):.2f}x")


if __name__ == "__main__":
    main()
