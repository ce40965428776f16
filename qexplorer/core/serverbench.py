"""`qexplorer bench-server`: a sweep against a running server, stored beside local results."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from qexplorer.core.bench import server
from qexplorer.core.errors import UserError
from qexplorer.core.results import ResultsStore
from qexplorer.core.runplan import StderrProgress
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
             settings: Settings, progress: StderrProgress) -> dict[str, Any]:
    from qexplorer.core.catalog import Catalog
    from qexplorer.core.pipeline import JobSpec, _ensure_reference, _take_path, model_key
    from qexplorer.core.quantize.torch_quant import bf16_checkpoint

    spec = Catalog(extra_paths=settings.models).resolve(args.quality)
    job = JobSpec(model_ref=args.quality, precision="bf16", data_dir=str(settings.results_path), quality=True,
                  quality_tokens=args.quality_tokens)
    work_dir = Path(job.data_dir) / "artifacts" / model_key(spec)
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    gen = _ensure_reference(spec, job, work_dir, None)
    try:
        while True:
            progress(next(gen))
    except StopIteration as done:
        reference = done.value
    folders: list[Path] = []
    for event in _take_path(bf16_checkpoint(spec, work_dir), folders):
        progress(event)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folders[0]))
    stats: dict[str, Any] = {}
    for item in server.server_quality(target, model_id, reference, tokenizer):
        if isinstance(item, dict):
            stats = item
        else:
            progress(item)
    return stats


def bench_server(args: argparse.Namespace, settings: Settings) -> int:
    target = server.ServerTarget(args.url, api_key_env=args.api_key_env, timeout_s=args.timeout)
    levels = _levels(args.concurrency)
    progress = StderrProgress(sys.stderr, f"[{target.host}]")
    result: dict[str, Any] = {}
    for item in server.sweep(target, levels, args.repetitions, args.max_tokens):
        if isinstance(item, dict):
            result = item
        else:
            progress(item)
    if args.quality and "error" not in result:
        try:
            result["quality"] = _quality(target, result["model_id"], args, settings, progress)
        except UserError as exc:
            result["quality_error"] = str(exc)
    record = server.record_from_sweep(result)
    if result.get("quality"):
        record["quality"] = result["quality"]
    if result["levels"]:
        ResultsStore.in_dir(settings.results_path).add(record)
    if args.json:
        json.dump({"schema": "qexplorer.server/1", **result}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(_text(result))
    if "error" in result:
        sys.stderr.write(f"qexplorer: {result['error']} (kept {len(result['levels'])} finished level(s)).\n")
        return 1
    return 0


def _text(result: dict[str, Any]) -> str:
    lines = [f"{result['model_id']} at {result['host']}: {result['max_tokens']} tokens per request, "
             f"{result['repetitions']} repetitions per level (measured)",
             f"{'conc.':>5} {'aggregate tok/s':>18} {'per-stream tok/s':>18} {'TTFT ms':>14} "
             f"{'ITL mean/p50/p99 ms':>22}"]
    for lv in result["levels"]:
        agg, per, ttft, itl = lv["aggregate_tok_s"], lv["decode_tok_s_per_stream"], lv["ttft_s"], lv["itl_ms"]
        lines.append(
            f"{lv['concurrency']:>5} {agg['mean']:>9.1f} ± {agg['sd']:<6.1f} "
            f"{(per or {}).get('mean', 0):>9.1f} ± {(per or {}).get('sd', 0):<6.1f} "
            f"{1000 * (ttft or {}).get('mean', 0):>7.0f} ± {1000 * (ttft or {}).get('sd', 0):<4.0f} "
            f"{(itl or {}).get('mean', 0):>7.1f} / {(itl or {}).get('p50', 0):.1f} / {(itl or {}).get('p99', 0):.1f}")
    quality = result.get("quality")
    if quality:
        lines.append(f"quality vs local reference: approximate KLD {quality['kld_mean']:.4f}, same top-1 "
                     f"{quality['same_top1_pct']:.1f} % over {quality['n_positions']} positions "
                     f"({quality['approximation']})")
    if result.get("quality_error"):
        lines.append(f"quality: {result['quality_error']}")
    return "\n".join(lines) + "\n"
