"""The load sweep's rules: a level's percentiles and rates, whether it meets the service objective, the goodput
(the highest concurrency that does, and its throughput), and when to stop raising the concurrency.

Percentiles are nearest-rank over every request of the level's timed repetitions (TTFT: one per request; ITL:
every gap between two streamed tokens of a request), as the existing ITL figures.

The stop rule follows GuideLLM's scheduler constraints (``guidellm/scheduler/constraints/error.py`` and
``saturation.py``), carried from its per-request scheduler to whole concurrency levels:

* ``max_error_rate``: GuideLLM stops once errored ÷ processed requests reaches the rate; here, after the first
  level whose own error rate reaches :attr:`StopRule.max_error_rate` (10 % by default);
* over-saturation: GuideLLM stops when concurrent requests and TTFT both climb with a significant slope, i.e.
  the server no longer keeps up. A concurrency sweep sets the concurrency itself, so the same symptom is a
  level whose output tok/s grew less than :attr:`StopRule.min_throughput_gain` (10 %) over the best earlier
  level while its TTFT p99 grew more than :attr:`StopRule.min_ttft_growth` (25 %) over the previous level:
  more streams only queue;
* optionally (not in GuideLLM), a level that misses the objective by more than
  :attr:`StopRule.beyond_objective` times a limit: higher levels cannot meet it either.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from qexplorer.core.domain.load import Goodput, LevelLoad, Percentiles, ServiceObjective, StopRule
from qexplorer.core.domain.record import ServerLevel
from qexplorer.core.server.client import StreamTiming


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of the values at or below it."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def percentiles(values: Sequence[float], scale: float = 1.0) -> Percentiles | None:
    if not values:
        return None
    return Percentiles(mean=scale * statistics.fmean(values), p50=scale * percentile(values, 0.5),
                       p90=scale * percentile(values, 0.9), p99=scale * percentile(values, 0.99), n=len(values))


def level_load(timings: Sequence[StreamTiming], wall_s: float, errors: Sequence[str]) -> LevelLoad:
    """A level's load figures from its successful requests, its failures and its summed wall time."""
    ttft = [t.ttft_s for t in timings if t.ttft_s is not None]
    itl = [gap for t in timings for gap in t.itl_s]
    tokens = sum(t.tokens for t in timings)
    return LevelLoad(time_to_first_token_ms=percentiles(ttft, 1000.0), inter_token_latency_ms=percentiles(itl, 1000.0),
                     output_tokens_per_second=tokens / wall_s if wall_s > 0 else 0.0,
                     requests_per_second=len(timings) / wall_s if wall_s > 0 else 0.0,
                     successful=len(timings), errored=len(errors), first_error=errors[0] if errors else None)


def misses(level: ServerLevel, objective: ServiceObjective) -> list[str]:
    """Why ``level`` misses the objective, one short clause per limit; empty when it meets it."""
    load = level.load
    if load is None or load.successful == 0:
        return ["no request succeeded" if load is not None else "no load figures"]
    why = []
    ttft, itl = load.time_to_first_token_ms, load.inter_token_latency_ms
    if ttft is None:
        why.append("no first token seen")
    elif ttft.p99 > 1000 * objective.ttft_p99_s:
        why.append(f"TTFT p99 {ttft.p99 / 1000:.2f} s > {objective.ttft_p99_s:g} s")
    if itl is None:
        why.append("no inter-token gap measured (one token per request)")
    elif itl.p99 > objective.itl_p99_ms:
        why.append(f"ITL p99 {itl.p99:.1f} ms > {objective.itl_p99_ms:g} ms")
    if load.error_rate > objective.max_error_rate:
        why.append(f"{load.errored} of {load.successful + load.errored} requests failed")
    return why


def meets(level: ServerLevel, objective: ServiceObjective) -> bool:
    return not misses(level, objective)


def goodput(levels: Sequence[ServerLevel], objective: ServiceObjective, depth: int = 0) -> Goodput:
    """The highest concurrency at ``depth`` that meets the objective, its output tok/s and requests/s."""
    at_depth = sorted((lv for lv in levels if lv.depth == depth), key=lambda lv: lv.concurrency)
    where = f" at depth {depth}" if depth else ""
    passing = [lv for lv in at_depth if meets(lv, objective)]
    if passing:
        best = passing[-1]
        load = best.load
        assert load is not None  # meets() holds only with load figures
        streams = "stream" if best.concurrency == 1 else "streams"
        return Goodput(depth=depth, concurrency=best.concurrency, output_tokens_per_second=load.output_tokens_per_second,
                       requests_per_second=load.requests_per_second,
                       sentence=f"serves {best.concurrency} {streams}{where} at {load.output_tokens_per_second:.1f} "
                                f"tok/s total ({load.requests_per_second:.2f} requests/s) within "
                                f"{objective.describe()}")
    if not at_depth:
        reason = "no level was measured"
    else:
        first = at_depth[0]
        reason = f"at concurrency {first.concurrency}, " + "; ".join(misses(first, objective))
    return Goodput(depth=depth, concurrency=None, output_tokens_per_second=None, requests_per_second=None,
                   sentence=f"no concurrency tested{where} meets {objective.describe()}: {reason}")


def stop_reason(levels: Sequence[ServerLevel], rule: StopRule, objective: ServiceObjective) -> str | None:
    """The sentence why no level above the last of ``levels`` (one depth, rising concurrency) is worth
    measuring, or ``None`` to go on."""
    last = levels[-1]
    load = last.load
    if load is None:
        return None
    total = load.successful + load.errored
    if load.errored and load.error_rate >= rule.max_error_rate:
        return (f"stopped after concurrency {last.concurrency}: {load.errored} of {total} requests failed "
                f"({100 * load.error_rate:.0f} % ≥ {100 * rule.max_error_rate:g} %): {load.first_error}")
    earlier = [lv for lv in levels[:-1] if lv.load is not None and lv.load.successful]
    previous = levels[-2].load if len(levels) > 1 else None
    if earlier and previous is not None and load.successful:
        best = max(earlier, key=lambda lv: lv.load.output_tokens_per_second if lv.load else 0.0)
        best_tok_s = best.load.output_tokens_per_second if best.load else 0.0
        now_ttft = load.time_to_first_token_ms
        before_ttft = previous.time_to_first_token_ms
        if best_tok_s > 0 and now_ttft is not None and before_ttft is not None and before_ttft.p99 > 0:
            gain = load.output_tokens_per_second / best_tok_s - 1
            growth = now_ttft.p99 / before_ttft.p99 - 1
            if gain < rule.min_throughput_gain and growth > rule.min_ttft_growth:
                return (f"stopped after concurrency {last.concurrency}: saturated, output "
                        f"{load.output_tokens_per_second:.1f} tok/s is {100 * gain:+.0f} % against "
                        f"{best_tok_s:.1f} tok/s at concurrency {best.concurrency} (less than "
                        f"+{100 * rule.min_throughput_gain:g} %) while TTFT p99 grew {100 * growth:.0f} % "
                        f"({before_ttft.p99:.0f} → {now_ttft.p99:.0f} ms)")
    factor = rule.beyond_objective
    if factor is not None:
        ttft, itl = load.time_to_first_token_ms, load.inter_token_latency_ms
        if ttft is not None and ttft.p99 > factor * 1000 * objective.ttft_p99_s:
            return (f"stopped after concurrency {last.concurrency}: TTFT p99 {ttft.p99 / 1000:.2f} s is more than "
                    f"{factor:g}× the objective's {objective.ttft_p99_s:g} s")
        if itl is not None and itl.p99 > factor * objective.itl_p99_ms:
            return (f"stopped after concurrency {last.concurrency}: ITL p99 {itl.p99:.1f} ms is more than "
                    f"{factor:g}× the objective's {objective.itl_p99_ms:g} ms")
    return None
