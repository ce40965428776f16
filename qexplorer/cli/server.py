"""`qexplorer bench-server`: a sweep against a running server, stored beside local results."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from qexplorer.cli.run import StderrProgress
from qexplorer.core import server
from qexplorer.core.domain.bench import parse_depths
from qexplorer.core.domain.events import drive
from qexplorer.core.domain.record import ServerQuality, ServerSweep
from qexplorer.core.errors import UserError
from qexplorer.core.results import ResultsStore
from qexplorer.core.serial import to_jsonable
from qexplorer.core.settings import Settings
from qexplorer.core.units import format_bytes


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"--concurrency {text!r} is not a list of numbers such as 1,4,16.") from None
    if not levels or min(levels) < 1:
        raise UserError("--concurrency needs positive numbers, such as 1,4,16.")
    return levels


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
    levels = _levels(args.concurrency)
    depths = parse_depths(args.depth)
    if args.prompt_tokens < 1 or args.max_tokens < 1:
        raise UserError("--prompt-tokens and --max-tokens need positive numbers.")
    progress = StderrProgress(sys.stderr, f"[{target.host}]")
    result: ServerSweep = drive(server.sweep(target, levels, args.repetitions, args.max_tokens,
                                             prompt_tokens=args.prompt_tokens, depths=depths,
                                             unique=not args.same_prompt), progress)
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
        sys.stdout.write(_text(result))
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
