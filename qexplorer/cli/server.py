"""`qexplorer bench-server`: a sweep against a running server, stored beside local results."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from qexplorer.cli.run import StderrProgress
from qexplorer.core.bench import server
from qexplorer.core.errors import UserError
from qexplorer.core.jobs.events import drive
from qexplorer.core.jobs.record import ServerQuality, ServerSweep
from qexplorer.core.results import ResultsStore
from qexplorer.core.serial import to_jsonable
from qexplorer.core.settings import Settings


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
    from qexplorer.core.jobs.spec import JobSpec
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
    progress = StderrProgress(sys.stderr, f"[{target.host}]")
    result: ServerSweep = drive(server.sweep(target, levels, args.repetitions, args.max_tokens), progress)
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


def _text(result: ServerSweep) -> str:
    lines = [f"{result.model_id} at {result.host}: {result.max_tokens} tokens per request, "
             f"{result.repetitions} repetitions per level (measured)",
             f"{'conc.':>5} {'aggregate tok/s':>18} {'per-stream tok/s':>18} {'TTFT ms':>14} "
             f"{'ITL mean/p50/p99 ms':>22}"]
    for lv in result.levels:
        agg, per, ttft, itl = lv.aggregate_tok_s, lv.decode_tok_s_per_stream, lv.ttft_s, lv.itl
        lines.append(
            f"{lv.concurrency:>5} {agg.mean:>9.1f} ± {agg.sd:<6.1f} "
            f"{per.mean if per else 0:>9.1f} ± {per.sd if per else 0:<6.1f} "
            f"{1000 * (ttft.mean if ttft else 0):>7.0f} ± {1000 * (ttft.sd if ttft else 0):<4.0f} "
            f"{itl.mean_ms if itl else 0:>7.1f} / {itl.p50_ms if itl else 0:.1f} / {itl.p99_ms if itl else 0:.1f}")
    quality = result.quality
    if quality is not None and quality.kld_mean is not None:
        lines.append(f"quality vs local reference: approximate KLD {quality.kld_mean:.4f}, same top-1 "
                     f"{quality.same_top1_pct:.1f} % over {quality.n_positions} positions "
                     f"({quality.approximation})")
    if result.quality_error:
        lines.append(f"quality: {result.quality_error}")
    return "\n".join(lines) + "\n"
