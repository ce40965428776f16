"""`qexplorer run`: plan, then one worker per precision, progress on stderr, results on stdout."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import TextIO

from qexplorer.core import precisions
from qexplorer.core.bench import BenchConfig
from qexplorer.core.catalog import Catalog
from qexplorer.core.errors import UserError
from qexplorer.core.events import Event
from qexplorer.core.jobs import JobOutcome, JobRunner, store_outcome
from qexplorer.core.pipeline import JobSpec
from qexplorer.core.planner import PlanRequest, plan_job_peak, plan_precision
from qexplorer.core.results import ResultsStore, flat_row
from qexplorer.core.safety import check_loadable
from qexplorer.core.settings import Settings
from qexplorer.core.telemetry import make_sampler
from qexplorer.core.units import format_bytes


class StderrProgress:
    """A one-line progress bar on a terminal; plain lines when stderr is a file."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream = stream
        self.label = label
        self.tty = stream.isatty()
        self.phase = ""

    def __call__(self, event: Event) -> None:
        if event.type == "phase":
            self.phase = event.phase
            self._line(f"{event.message}")
        elif event.type == "progress" and event.total:
            width = 20
            filled = int(width * event.done / event.total)
            self._line(f"{self.phase} [{'█' * filled}{'░' * (width - filled)}] {event.done:g}/{event.total:g}")
        elif event.type == "log" and event.level == "warning":
            self._line(f"warning: {event.message}", keep=True)

    def _line(self, text: str, keep: bool = False) -> None:
        line = f"{self.label} {text}"
        if self.tty and not keep:
            self.stream.write("\r\033[K" + line[:200])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self, outcome: JobOutcome) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        if outcome.ok and outcome.record:
            tg = outcome.record.get("decode_tok_s", {})
            self.stream.write(f"{self.label} done: decode {tg.get('mean', 0):.1f} ± {tg.get('sd', 0):.1f} tok/s, "
                              f"peak {format_bytes(outcome.peak_rss_bytes)}\n")
        else:
            self.stream.write(f"{self.label} {outcome.status}: {outcome.error}\n")
        self.stream.flush()


def run_precisions(args: argparse.Namespace, settings: Settings) -> int:
    chosen = precisions.parse_list(args.precision)
    if args.corpus:  # a bad evaluation file is caught before any worker starts
        from pathlib import Path

        from qexplorer.core.quality import load_corpus

        load_corpus(Path(args.corpus))
    catalog = Catalog(extra_paths=settings.models)
    spec = catalog.resolve(args.model)
    check_loadable(spec, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    bench = BenchConfig.quick() if args.quick else BenchConfig()
    if args.repetitions:
        bench = BenchConfig(bench.prompt_tokens, bench.gen_tokens, args.repetitions, bench.threads)
    if args.threads:
        bench = BenchConfig(bench.prompt_tokens, bench.gen_tokens, bench.repetitions, args.threads)
    sampler = make_sampler(args.simulate, reserve_bytes=settings.reserve_bytes)
    snapshot = sampler.sample()
    request = PlanRequest(context=bench.prompt_tokens + bench.gen_tokens)
    jobs = []
    for precision in chosen:
        plan = plan_precision(spec, precision, request, snapshot)
        if plan.verdict == "does not fit" and not args.force:
            raise UserError(
                f"{precision.label} does not fit: it needs about {format_bytes(plan.total_bytes)} and the headroom "
                f"is {format_bytes(plan.headroom_bytes)}; free memory, choose a smaller precision, or pass --force."
            )
        jobs.append(JobSpec(
            model_ref=args.model, precision=precision.key, data_dir=str(settings.results_path), bench=bench,
            model_paths=tuple(settings.models), model_name=spec.name, model_path=spec.path,
            planned_peak_bytes=plan_job_peak(spec, precision, bench, on_gpu=plan.runs_on == "GPU"),
            planned_total_bytes=plan.total_bytes, quality=args.quality, quality_corpus=args.corpus,
            quality_tokens=args.quality_tokens, quality_ctx=args.quality_ctx, reference_precision=args.reference,
            trust_remote_code=args.trust_remote_code,
        ))
    store = ResultsStore.in_dir(settings.results_path)
    runner = JobRunner(sampler=sampler, interval_s=settings.refresh_s)
    outcomes: list[JobOutcome] = []
    cancel = threading.Event()
    interrupted = False
    try:
        for index, job in enumerate(jobs, start=1):
            progress = StderrProgress(sys.stderr, f"[{index}/{len(jobs)}] {job.precision}")
            outcome = runner.run(job, on_event=progress, cancel=cancel)
            progress.done(outcome)
            store_outcome(store, outcome)
            outcomes.append(outcome)
    except KeyboardInterrupt:
        # The runner's finally has already ended the child; keep what finished.
        interrupted = True
        sys.stderr.write("\ninterrupted: the running job was stopped; finished results are saved.\n")
    finally:
        sampler.close()
    rows = [flat_row(r) for r in store.all(spec.path)[-len(outcomes):]] if outcomes else []
    if args.json:
        json.dump({"schema": "qexplorer.run/1", "model": spec.name,
                   "jobs": [{"precision": o.job.precision, "status": o.status, "error": o.error,
                             "log": str(o.log_path), "result": o.record} for o in outcomes],
                   "results": [r for r in rows if r["status"] == "ok"]}, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        from qexplorer.core.results import to_markdown

        ok = [r for r in store.latest_per_precision(spec.path) if r.precision in {o.job.precision for o in outcomes}]
        sys.stdout.write(to_markdown(ok))
    if interrupted:
        return 130
    return 0 if all(o.ok for o in outcomes) else 1
