"""`qexplorer bench-server`: a sweep against a running server, stored beside local results."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from qexplorer.cli.load import load_plan, parse_levels
from qexplorer.cli.run import StderrProgress
from qexplorer.core import server
from qexplorer.core.domain.bench import parse_depths
from qexplorer.core.domain.events import drive
from qexplorer.core.domain.load import Percentiles, ServerMetrics
from qexplorer.core.domain.record import ServerQuality, ServerSweep
from qexplorer.core.errors import UserError
from qexplorer.core.results import ResultsStore
from qexplorer.core.serial import to_jsonable
from qexplorer.core.settings import Settings
from qexplorer.core.units import format_bytes


def _quality(target: server.ServerTarget, model_id: str, args: argparse.Namespace,
             settings: Settings, progress: StderrProgress) -> ServerQuality:
    from qexplorer.core.artifacts import model_work_dir
    from qexplorer.core.catalog import Catalog
    from qexplorer.core.domain.spec import JobSpec
    from qexplorer.core.quantize.torch_quant import bf16_checkpoint
    from qexplorer.core.reference import ensure_reference

    spec = Catalog(extra_paths=settings.models).resolve(args.quality)
    job = JobSpec(model_ref=args.quality, precision="bf16", data_dir=str(settings.results_path), quality=True,
                  quality_tokens=args.quality_tokens)
    work_dir = model_work_dir(Path(job.data_dir), spec)
    reference = drive(ensure_reference(spec, job, work_dir), progress)
    folder = drive(bf16_checkpoint(spec, work_dir), progress)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return drive(server.server_quality(target, model_id, reference, tokenizer), progress)


def bench_server(args: argparse.Namespace, settings: Settings) -> int:
    target = server.ServerTarget(args.url, api_key_env=args.api_key_env, timeout_s=args.timeout)
    load = load_plan(args, settings) if args.load is not None else None
    levels = parse_levels(args.load, "--load") if load is not None else parse_levels(args.concurrency)
    depths = parse_depths(args.depth)
    if args.prompt_tokens < 1 or args.max_tokens < 1:
        raise UserError("--prompt-tokens and --max-tokens need positive numbers.")
    progress = StderrProgress(sys.stderr, f"[{target.host}]")
    result: ServerSweep = drive(server.sweep(target, levels, args.repetitions, args.max_tokens,
                                             prompt_tokens=args.prompt_tokens, depths=depths,
                                             unique=not args.same_prompt, load=load), progress)
    if args.quality and result.error is None:
        try:
            result = replace(result, quality=_quality(target, result.model_id, args, settings, progress))
        except UserError as exc:
            result = replace(result, quality_error=str(exc))
    if result.levels:
        ResultsStore.in_dir(settings.results_path).add(server.record_from_sweep(result))
    if args.json:
        json.dump({"schema": "qexplorer.server/2", **to_jsonable(result)}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(_load_text(result) if result.load_plan is not None else _text(result))
    if result.error is not None:
        sys.stderr.write(f"qexplorer: {result.error} (kept {len(result.levels)} finished level(s)).\n")
        return 1
    return 0


def _ms(stat) -> str:
    return f"{1000 * stat.mean:.1f} ± {1000 * stat.sd:.1f}" if stat else "-"


def _ts(stat) -> str:
    return f"{stat.mean:.1f} ± {stat.sd:.1f}" if stat else "-"


def _text(result: ServerSweep) -> str:
    """llama-benchy's table (test, t/s, ttfr, est_ppt, e2e_ttft), one block per concurrency level."""
    prompts = "unique prompts" if result.unique_prompts else "the same prompt every time (prefix-cache test)"
    lines = [f"{result.model_id} at {result.host} (measured): pp{result.prompt_tokens} / tg{result.max_tokens}, "
             f"{result.repetitions} repetitions, {prompts}, latency {result.latency_ms or 0:.1f} ms",
             f"output length: {result.exact_output or 'n/a'}; tokens counted from {result.token_count}"]
    for level in sorted({lv.concurrency for lv in result.levels}):
        total = " (total)" if level > 1 else ""
        lines += ["", f"concurrency {level}",
                  f"{'test':>16} {'t/s' + total:>18} {'ttfr (ms)':>16} {'est_ppt (ms)':>16} {'e2e_ttft (ms)':>16}"
                  f" {'ITL p50/p99 ms':>16}  noise"]
        for lv in (lv for lv in result.levels if lv.concurrency == level):
            at = f" @ d{lv.depth}" if lv.depth else ""
            noise = "noisy" if lv.noise and lv.noise.noisy else "quiet" if lv.noise else "-"
            itl = f"{lv.itl.p50_ms:.1f} / {lv.itl.p99_ms:.1f}" if lv.itl else "-"
            lines.append(f"{'pp' + str(lv.prompt_tokens) + at:>16} {_ts(lv.pp_tok_s):>18} {_ms(lv.ttfr_s):>16} "
                         f"{_ms(lv.est_ppt_s):>16} {_ms(lv.ttft_s):>16} {'':>16}  {noise}")
            lines.append(f"{'tg' + str(result.max_tokens) + at:>16} {_ts(lv.tg_tok_s):>18} {'':>16} {'':>16} "
                         f"{'':>16} {itl:>16}  {noise}")
        lines.extend(f"  {lv.noise.reason}" for lv in result.levels
                     if lv.concurrency == level and lv.noise and lv.noise.reason)
    if result.process is not None:
        peak = format_bytes(result.process.peak_rss_bytes) if result.process.peak_rss_bytes else "n/a"
        lines.append(f"server process: {result.process.name} (pid {result.process.pid}), peak RSS {peak} "
                     f"({result.process.note})")
    elif result.process_note:
        lines.append(f"server memory: {result.process_note}")
    quality = result.quality
    if quality is not None and quality.kld_mean is not None:
        lines.append(f"quality vs local reference: approximate KLD {quality.kld_mean:.4f}, same top-1 "
                     f"{quality.same_top1_pct:.1f} % over {quality.n_positions} positions "
                     f"({quality.approximation}; alignment {quality.logprob_alignment})")
    if result.quality_error:
        lines.append(f"quality: {result.quality_error}")
    return "\n".join(lines) + "\n"


def _pct3(p: Percentiles | None, scale: float = 1.0, digits: int = 0) -> str:
    return f"{scale * p.p50:.{digits}f} / {scale * p.p90:.{digits}f} / {scale * p.p99:.{digits}f}" if p else "-"


def _server_view(metrics: ServerMetrics | None) -> str:
    if metrics is None:
        return "-"
    parts = []
    if metrics.kv_cache_usage_peak_pct is not None:
        parts.append(f"KV {metrics.kv_cache_usage_peak_pct:.0f} %")
    if metrics.running_max is not None:
        parts.append(f"run {metrics.running_max}")
    if metrics.waiting_max is not None:
        parts.append(f"wait {metrics.waiting_max}")
    if metrics.preemptions:
        parts.append(f"preempt {metrics.preemptions}")
    return ", ".join(parts) or "-"


def _server_detail(m: ServerMetrics) -> str:
    """The counters and histograms of one level, as far as the engine exports them."""
    parts = []
    if m.prefill_s_per_request is not None:
        parts.append(f"prefill {1000 * m.prefill_s_per_request:.0f} ms per request")
    if m.decode_s_per_request is not None:
        parts.append(f"decode {1000 * m.decode_s_per_request:.0f} ms per request")
    if m.preemptions is not None:
        parts.append(f"{m.preemptions} preemptions")
    if m.server_prompt_tok_s is not None:
        parts.append(f"the server's own prompt processing {m.server_prompt_tok_s:.1f} tok/s")
    if m.server_decode_tok_s is not None:
        parts.append(f"generation {m.server_decode_tok_s:.1f} tok/s")
    return ", ".join(parts)


def _load_text(result: ServerSweep) -> str:
    """One row per level: GuideLLM's figures (TTFT and ITL p50 / p90 / p99, output tok/s, requests/s,
    errors), the server's own view from /metrics, host noise, and whether the level meets the objective; then
    the goodput and early-stop sentences."""
    from qexplorer.core.server.load import misses

    plan = result.load_plan
    assert plan is not None
    prompts = "unique prompts" if result.unique_prompts else "the same prompt every time (prefix-cache test)"
    lines = [f"{result.model_id} at {result.host} (measured), load sweep: pp{result.prompt_tokens} / "
             f"tg{result.max_tokens} tokens, {result.repetitions} repetitions per level after a warm-up, {prompts}",
             f"output length: {result.exact_output or 'n/a'}; tokens counted from {result.token_count}",
             f"objective: {plan.objective.describe()}", ""]
    header = (f"{'conc':>5} {'TTFT p50/p90/p99 (ms)':>23} {'ITL p50/p90/p99 (ms)':>22} {'output (tok/s)':>15} "
              f"{'req/s':>7} {'errors':>8}  {'server /metrics':<34} {'host':<6} objective")
    for depth in sorted({lv.depth for lv in result.levels}):
        if depth:
            lines.append(f"depth {depth} tokens")
        lines.append(header)
        for lv in (lv for lv in result.levels if lv.depth == depth):
            load = lv.load
            if load is None:
                continue
            noise = "noisy" if lv.noise and lv.noise.noisy else "quiet" if lv.noise else "-"
            missed = misses(lv, plan.objective)
            verdict = "met" if not missed else "missed: " + "; ".join(missed)
            errors = f"{load.errored}/{load.successful + load.errored}"
            lines.append(f"{lv.concurrency:>5} {_pct3(load.time_to_first_token_ms):>23} "
                         f"{_pct3(load.inter_token_latency_ms, digits=1):>22} {load.output_tokens_per_second:>15.1f} "
                         f"{load.requests_per_second:>7.2f} {errors:>8}  {_server_view(lv.server_metrics):<34} "
                         f"{noise:<6} {verdict}")
        lines.append("")
    for good in result.goodput:
        lines.append(f"goodput: {result.model_id} {good.sentence}")
    if result.stopped_early:
        lines.append(f"early stop: {result.stopped_early}")
    first_error = next(((lv.concurrency, lv.load.first_error) for lv in result.levels
                        if lv.load and lv.load.first_error), None)
    if first_error and first_error[1] not in (result.stopped_early or ""):
        lines.append(f"first error at concurrency {first_error[0]}: {first_error[1]}")
    metrics = [lv for lv in result.levels if lv.server_metrics is not None]
    if metrics:
        first = metrics[0].server_metrics
        lines.append(f"server /metrics: {first.engine}, sampled every {first.interval_s:g} s during each level "
                     "(KV = peak KV-cache usage, run / wait = most requests running / queued)")
        for lv in metrics:
            detail = _server_detail(lv.server_metrics)
            if detail:
                lines.append(f"  concurrency {lv.concurrency}: {detail}")
    elif result.metrics_note:
        lines.append(f"server /metrics: {result.metrics_note}")
    lines.extend(f"noise at concurrency {lv.concurrency}: {lv.noise.reason}" for lv in result.levels
                 if lv.noise and lv.noise.reason)
    if result.process is not None:
        peak = format_bytes(result.process.peak_rss_bytes) if result.process.peak_rss_bytes else "n/a"
        lines.append(f"server process: {result.process.name} (pid {result.process.pid}), peak RSS {peak} "
                     f"({result.process.note})")
    elif result.process_note:
        lines.append(f"server memory: {result.process_note}")
    return "\n".join(lines) + "\n"
