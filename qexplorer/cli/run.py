"""`qexplorer run` and `qexplorer export`: plan, queue, one worker per job; progress on stderr, results on stdout."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import TextIO

from qexplorer.cli.load import load_spec
from qexplorer.core import precisions
from qexplorer.core.catalog import Catalog
from qexplorer.core.domain.bench import BenchConfig, parse_depths
from qexplorer.core.domain.events import JobEvent, Log, Phase, Progress
from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.errors import UserError
from qexplorer.core.eta import format_duration
from qexplorer.core.jobs.queue import JobQueue, JobView
from qexplorer.core.jobs.runner import JobRunner
from qexplorer.core.kinds import JobAction
from qexplorer.core.planner import hardware_from_snapshot
from qexplorer.core.results import ResultsStore, flat_row, to_markdown
from qexplorer.core.safety import check_loadable
from qexplorer.core.serial import to_jsonable
from qexplorer.core.session import RunOptions, RunOrder, calibrate_machine, plan_run
from qexplorer.core.settings import Settings, engine_env
from qexplorer.core.tasks.run import check_can_score, parse_task_list
from qexplorer.core.tasks.summary import summarize, verdicts
from qexplorer.core.telemetry import local_sampler
from qexplorer.core.units import format_bytes


class StderrProgress:
    """A one-line progress bar on a terminal; plain lines when stderr is a file."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream = stream
        self.label = label
        self.tty = stream.isatty()
        self.phase = ""
        self.left = ""  # "~1:20 left", set by the queue's reporter from the job's estimate

    def __call__(self, event: JobEvent) -> None:
        if isinstance(event, Phase):
            self.phase = event.name
            self._line(event.message)
        elif isinstance(event, Progress) and event.total:
            width = 20
            filled = int(width * event.done / event.total)
            self._line(f"{self.phase} [{'█' * filled}{'░' * (width - filled)}] {event.done:g}/{event.total:g}")
        elif isinstance(event, Log) and event.is_warning:
            self._line(f"warning: {event.message}", keep=True)

    def _line(self, text: str, keep: bool = False) -> None:
        line = f"{self.label} {text}" + (f" ({self.left})" if self.left and not keep else "")
        if self.tty and not keep:
            self.stream.write("\r\033[K" + line[:200])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self, view: JobView) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        speed = view.record.speed if view.record else None
        took = (f", took {format_duration(view.took_s)} (estimated {format_duration(view.estimate.total_s)})"
                if view.took_s is not None and view.estimate is not None else "")
        if view.finished and view.status == "ok" and speed is not None:
            tg = speed.decode_tok_s
            deeper = "".join(f", {s.decode_tok_s.mean:.1f} ± {s.decode_tok_s.sd:.1f} at depth {s.depth}"
                             for s in view.record.depth_speeds)
            record = view.record
            reused = (f" (reused result #{record.reused_from}, measured {record.reused_measured_at})"
                      if record.reused_from is not None else "")
            alone = (f"; {', '.join(record.paused_for_timing)} paused while it was timed"
                     if record.paused_for_timing else "")
            self.stream.write(f"{self.label} done{reused}: decode {tg.mean:.1f} ± {tg.sd:.1f} tok/s"
                              f"{f' at depth {speed.depth}' if speed.depth else ''}{deeper}, "
                              f"peak {format_bytes(record.memory.peak_rss_bytes or view.peak_rss_bytes)}{took}{alone}\n")
            for noisy in (s for s in (speed, *view.record.depth_speeds) if s.noisy and s.noise):
                self.stream.write(f"{self.label} warning: {noisy.noise.reason} Re-run on a quiet machine before "
                                  "trusting this speed.\n")
        else:
            self.stream.write(f"{self.label} {view.status}: {view.error}\n")
        self.stream.flush()


class _Reporter:
    """Routes the queue's views to one progress line per job (the CLI's consumer of JobView)."""

    def __init__(self, labels: dict[int, str]) -> None:
        self.bars = {job_id: StderrProgress(sys.stderr, label) for job_id, label in labels.items()}
        self.seen: dict[int, JobView] = {}

    def __call__(self, view: JobView) -> None:
        before = self.seen.get(view.id)
        self.seen[view.id] = view
        bar = self.bars.get(view.id)
        if bar is None:
            return
        left = view.left_s(time.monotonic())
        bar.left = f"~{format_duration(left)} left, estimated" if left is not None else ""
        if view.finished:
            if before is None or not before.finished:
                bar.done(view)
            return
        if before is None:
            return
        if view.phase != before.phase and view.phase:
            bar(Phase(view.phase, view.message))
        elif view.total and (view.done, view.total) != (before.done, before.total):
            bar(Progress(view.phase, view.done, view.total))
        if len(view.warnings) > len(before.warnings):
            bar(Log(view.warnings[-1], level="warning"))


def bench_config(args: argparse.Namespace) -> BenchConfig:
    bench = BenchConfig.quick() if args.quick else BenchConfig()
    return BenchConfig(bench.prompt_tokens, bench.gen_tokens, args.repetitions or bench.repetitions,
                       args.threads or bench.threads, depths=parse_depths(getattr(args, "depth", "0")))


def run_options(args: argparse.Namespace, settings: Settings | None = None) -> RunOptions:
    limit = args.tasks_limit
    if limit is not None and limit < 1:
        raise UserError(f"--tasks-limit {limit} is not a number of items; give 1 or more.")
    order = (RunOrder.AS_LISTED if getattr(args, "as_listed", False) else
             RunOrder.ONE_AT_A_TIME if getattr(args, "one_at_a_time", False) else RunOrder.OVERLAP)
    return RunOptions(bench=bench_config(args), quality=args.quality, corpus=args.corpus,
                      quality_tokens=args.quality_tokens, quality_ctx=args.quality_ctx, reference=args.reference,
                      engine_args=tuple(shlex.split(args.engine_args or "")),
                      trust_remote_code=args.trust_remote_code, reuse=not getattr(args, "remeasure", False),
                      order=order, force=args.force, shown_profile=args.simulate,
                      first_answer=not getattr(args, "no_quick_pass", False),
                      tasks=parse_task_list(args.tasks), tasks_limit=limit,
                      allow_unisolated_exec=args.allow_unisolated_exec,
                      load=load_spec(args, settings) if settings is not None else None)


def run_precisions(args: argparse.Namespace, settings: Settings) -> int:
    chosen = precisions.parse_list(args.precision)
    options = run_options(args, settings)
    # HumanEval without network isolation is refused now, in one sentence, not in every worker after its benchmark
    check_can_score(options.tasks, options.allow_unisolated_exec)
    if args.corpus:  # a bad evaluation file is caught before any worker starts
        from qexplorer.core.quality import load_corpus

        load_corpus(Path(args.corpus))
    spec = Catalog(extra_paths=settings.models).resolve(args.model)
    check_loadable(spec, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    # --simulate changes what is drawn, never what plans and guards real jobs: this machine does both
    sampler = local_sampler(reserve_bytes=settings.reserve_bytes)
    snapshot = sampler.sample()
    calibrate_machine(settings.results_path, options.bench.thread_count, lambda text: sys.stderr.write(text + "\n"))
    store = ResultsStore.in_dir(settings.results_path)
    planned = plan_run(args.model, spec, chosen, options, snapshot, settings.results_path,
                       settings.models, cuda=hardware_from_snapshot(snapshot).cuda,
                       measured={r.precision for r in store.all(spec.path)})
    if planned.refused:
        first = planned.refused[0]
        sampler.close()
        raise UserError(
            f"{first.label} does not fit: it needs about {format_bytes(first.need_bytes)} and the headroom "
            f"is {format_bytes(first.headroom_bytes)}; free memory, choose a smaller precision, or pass --force."
        )
    count = len(planned.specs)
    labels = [f"[{i}/{count}] {s.precision}" + (" (quick)" if s.first_pass else "")
              for i, s in enumerate(planned.specs, start=1)]
    for label, estimate in zip(labels, planned.estimates, strict=True):
        sys.stderr.write(f"{label} ~{format_duration(estimate.total_s)} (estimated {estimate.source}: "
                         + ", ".join(f"{p.name} {format_duration(p.seconds)}" for p in estimate.phases) + ")\n")
    sys.stderr.write(f"queue: {count} jobs, at most ~{format_duration(planned.total_s)} "
                     "estimated (one after another; overlapping shortens it)\n")
    if planned.first_answers_s is not None:
        sys.stderr.write(f"quick pass first: every precision answered within ~"
                         f"{format_duration(planned.first_answers_s)} (estimated), then the full method; each quick "
                         "row is replaced when its full figures land (--no-quick-pass: the full method only)\n")
    reporter = _Reporter({})
    queue = JobQueue(JobRunner(sampler=sampler, interval_s=settings.refresh_s, extra_env=engine_env(settings)), store,
                     on_change=reporter, overlap=planned.overlap)
    ids = queue.submit(planned.specs, labels, planned.estimates)
    reporter.bars.update({job_id: StderrProgress(sys.stderr, label) for job_id, label in zip(ids, labels,
                                                                                              strict=True)})
    interrupted = False
    try:
        queue.drain()
    except KeyboardInterrupt:
        # The runner's finally has already ended the child; keep what finished.
        interrupted = True
        sys.stderr.write("\ninterrupted: the running job was stopped; finished results are saved.\n")
    finally:
        sampler.close()
    views = [v for v in queue.views() if v.finished]
    stored = store.by_ids([v.stored_id for v in views if v.stored_id is not None])
    full = {r.precision for r in stored if r.status == "ok" and not r.record.first_pass}
    stored = [r for r in stored if not (r.record.first_pass and r.precision in full)]  # quick rows give way
    if args.json:
        accuracy = summarize([r.record for r in stored if r.status == "ok"], options.reference)
        json.dump({"schema": "qexplorer.run/2", "model": spec.name,
                   "jobs": [{"precision": s.precision, "first_pass": s.first_pass, "status": str(v.status),
                             "error": v.error, "log": v.log_path,
                             "stored_id": v.stored_id, "result": v.record.to_json() if v.record else None,
                             "estimate": {"total_s": round(v.estimate.total_s, 1), "source": v.estimate.source,
                                          "phases": [[p.name, round(p.seconds, 1)] for p in v.estimate.phases]}
                             if v.estimate is not None else None}
                            for v, s in zip(queue.views(), planned.specs, strict=True)],
                   "results": [flat_row(r) for r in stored if r.status == "ok"],
                   "task_accuracy": to_jsonable(accuracy), "task_verdicts": to_jsonable(verdicts(accuracy)),
                   "capacity_under_load": [_load_json(r) for r in stored if r.status == "ok" and r.record.server]},
                  sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(to_markdown([r for r in stored if r.status == "ok"]))
    if interrupted:
        return 130
    return 0 if len(views) == count and all(v.status == "ok" for v in views) else 1


def _load_json(result) -> dict:
    """One precision's load sweep: the objective, the goodput under it, why it stopped, every level's figures
    (GuideLLM's names, core.domain.load) beside the server's own /metrics."""
    sweep = result.record.server
    return {"precision": result.precision, "engine": str(result.record.engine.name or ""),
            "objective": sweep.load_plan.objective.describe() if sweep.load_plan else None,
            "goodput": to_jsonable(sweep.goodput), "stopped_early": sweep.stopped_early, "error": sweep.error,
            "prompt_tokens": sweep.prompt_tokens, "output_tokens": sweep.max_tokens,
            "repetitions": sweep.repetitions, "metrics_note": sweep.metrics_note,
            "levels": [{"concurrency": lv.concurrency, **to_jsonable(lv.load), "server_metrics": to_jsonable(
                lv.server_metrics)} for lv in sweep.levels if lv.load is not None]}


def export_precision(args: argparse.Namespace, settings: Settings) -> int:
    precision = precisions.get(args.precision)
    spec = Catalog(extra_paths=settings.models).resolve(args.model)
    check_loadable(spec, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    out = Path(args.out).expanduser()
    if not out.resolve().parent.exists():
        raise UserError(f"The folder {out.resolve().parent} does not exist; create it or choose another --out.")
    job = JobSpec(model_ref=args.model, precision=precision.key, data_dir=str(settings.results_path),
                  model_paths=tuple(settings.models), model_name=spec.name, model_path=spec.path,
                  action=JobAction.EXPORT, export_path=str(out.resolve()), trust_remote_code=args.trust_remote_code)
    outcome = JobRunner(interval_s=settings.refresh_s, extra_env=engine_env(settings)).run(job, on_event=StderrProgress(sys.stderr,
                                                                                        f"export {precision.key}"))
    if not outcome.ok or outcome.export is None:
        raise UserError(f"Export failed: {outcome.error}")
    export = outcome.export
    print(f"wrote {export.export_path} ({export.format}, {export.bytes:,} bytes, sha256 {export.sha256})")
    print(f"serve it with:\n  {export.serve_command}")
    return 0
