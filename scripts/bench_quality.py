"""Benchmark the quality pass: bounded memory, time per 1k tokens, and the top-k approximation.

    python scripts/bench_quality.py memory [--precision q8_0] [--tokens 4096,32768]
    python scripts/bench_quality.py topk [--precision q4_k_m]

`memory` runs each job twice (the first builds the reference, the second reuses it) and reports the
second run's peak RSS - benchmark + candidate pass - at each corpus length. Prints numbers only.
"""

from __future__ import annotations

import argparse
import tempfile

from qexplorer.core.domain.bench import BenchConfig
from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.jobs.runner import JobRunner


def memory(args: argparse.Namespace) -> None:
    runner = JobRunner(interval_s=0.25)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'tokens':>7} {'positions':>9} {'peak RSS (job)':>15} {'quality pass':>13} {'s / 1k tokens':>14}")
        for tokens in (int(t) for t in args.tokens.split(",")):
            spec = JobSpec(model_ref="default", precision=args.precision, data_dir=tmp, bench=BenchConfig.quick(),
                           quality=True, quality_tokens=tokens)
            runner.run(spec)  # builds (or reuses) the reference
            outcome = runner.run(spec)
            q, seconds = outcome.record.quality, outcome.record.timings.quality_s
            print(f"{q.reference.n_tokens:>7} {q.n_positions:>9} {outcome.peak_rss_bytes / 2**20:>11.0f} MiB "
                  f"{q.quality_peak_rss_bytes / 2**20:>9.0f} MiB {1000 * seconds / q.reference.n_tokens:>14.3f}")


def topk(args: argparse.Namespace) -> None:
    runner = JobRunner(interval_s=0.25)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'top-k':>6} {'KLD mean':>10} {'same top-1':>11} {'reference cache':>16}")
        for k in (int(v) for v in args.k.split(",")):
            spec = JobSpec(model_ref="default", precision=args.precision, data_dir=tmp, bench=BenchConfig.quick(),
                           quality=True, quality_tokens=args.tokens, top_k=k)
            q = runner.run(spec).record.quality
            print(f"{k:>6} {q.kld_mean:>10.6f} {q.same_top1_pct:>10.2f}% {q.reference.cache_bytes / 2**20:>12.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--precision", default="q8_0")
    m.add_argument("--tokens", default="4096,32768")
    t = sub.add_parser("topk")
    t.add_argument("--precision", default="q4_k_m")
    t.add_argument("--k", default="64,256,2048,8192")
    t.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    {"memory": memory, "topk": topk}[args.what](args)


if __name__ == "__main__":
    main()
