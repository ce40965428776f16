"""The load sweep's command-line values (``bench-server --load`` and ``run --load``), each checked in one
sentence: its levels, its objective and stop rule, and a job's sweep."""

from __future__ import annotations

import argparse

from qexplorer.core.domain.load import LoadPlan, LoadSweepSpec, ServiceObjective, StopRule
from qexplorer.core.errors import UserError
from qexplorer.core.settings import Settings


def parse_levels(text: str, flag: str = "--concurrency") -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a list of numbers such as 1,4,16.") from None
    if not levels or min(levels) < 1:
        raise UserError(f"{flag} needs positive numbers, such as 1,4,16.")
    return levels


def load_plan(args: argparse.Namespace, settings: Settings) -> LoadPlan:
    """The objective (flags over settings) and the stop rule of ``--load``, each checked."""
    ttft_s = args.slo_ttft_p99 if args.slo_ttft_p99 is not None else settings.slo_ttft_p99_s
    itl_ms = args.slo_itl_p99 if args.slo_itl_p99 is not None else settings.slo_itl_p99_ms
    if ttft_s <= 0 or itl_ms <= 0:
        raise UserError("--slo-ttft-p99 (seconds) and --slo-itl-p99 (milliseconds) need positive limits, "
                        "such as 2 and 100.")
    for flag, pct in (("--slo-error-rate", args.slo_error_rate), ("--stop-error-rate", args.stop_error_rate)):
        if not 0 <= pct <= 100:
            raise UserError(f"{flag} is {pct:g}: give a percentage from 0 to 100.")
    if args.stop_error_rate == 0:
        raise UserError("--stop-error-rate 0 would stop at any level; give a percentage above 0, such as 10.")
    if args.stop_min_gain < 0:
        raise UserError(f"--stop-min-gain is {args.stop_min_gain:g}: give a percentage of 0 or more, such as 10.")
    if args.stop_beyond_slo is not None and args.stop_beyond_slo < 1:
        raise UserError(f"--stop-beyond-slo is {args.stop_beyond_slo:g}: give a factor of 1 or more, such as 3.")
    if args.metrics_interval < 0:
        raise UserError("--metrics-interval needs 0 (never) or a number of seconds, such as 0.5.")
    return LoadPlan(objective=ServiceObjective(ttft_p99_s=ttft_s, itl_p99_ms=itl_ms,
                                               max_error_rate=args.slo_error_rate / 100),
                    stop=StopRule(max_error_rate=args.stop_error_rate / 100,
                                  min_throughput_gain=args.stop_min_gain / 100,
                                  beyond_objective=args.stop_beyond_slo),
                    metrics_interval_s=args.metrics_interval)


def load_spec(args: argparse.Namespace, settings: Settings) -> LoadSweepSpec | None:
    """``--load`` and its flags as the jobs' load sweep, each value checked; None without ``--load``."""
    if args.load is None:
        return None
    for flag, value in (("--load-prompt-tokens", args.load_prompt_tokens), ("--load-max-tokens", args.load_max_tokens),
                        ("--load-repetitions", args.load_repetitions)):
        if value < 1:
            raise UserError(f"{flag} is {value}: give 1 or more.")
    return LoadSweepSpec(levels=tuple(sorted(set(parse_levels(args.load, "--load")))), prompt_tokens=args.load_prompt_tokens,
                         max_tokens=args.load_max_tokens, repetitions=args.load_repetitions,
                         plan=load_plan(args, settings))
