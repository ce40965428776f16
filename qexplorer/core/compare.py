"""Compare measured precisions: rows, sorting, the Pareto frontier and a recommendation.

The recommendation follows the seed's decision framework (FACTS §5), applied
to measured numbers, the hardware's capabilities and the live headroom:

* quality first  → the lowest measured KLD among quantized precisions that run
  natively and fit (FP8 on FP8 tensor cores is near-lossless at no speed cost);
* memory first   → the smallest that keeps KLD acceptable (≤ 0.1, about Q3_K_M);
  calibrated INT4 (AWQ / GPTQ) usually;
* speed first    → the fastest measured decode with acceptable KLD;
* CPU / hybrid   → GGUF K-quants of 4 bits or more (Q4_K_M, Q5_K_M, Q6_K) with
  llama.cpp - also the only pool on a machine without a GPU.

Below 4 bits quality drops sharply; 2-3-bit results are shown, never preferred
for quality. The result names one precision and explains why in sentences with
the numbers, and what the runner-up would cost or save.
"""

from __future__ import annotations

from dataclasses import dataclass

from qexplorer.core.kinds import Family, Priority, SupportMode
from qexplorer.core.precisions import BY_KEY, Hardware, Precision
from qexplorer.core.results import StoredResult
from qexplorer.core.units import format_bytes

ACCEPTABLE_KLD = 0.1
PRIORITIES = tuple(Priority)
CPU_POOL = ("q6_k", "q5_k_m", "q4_k_m")
SORT_KEYS = ("precision", "memory", "decode", "kld", "top1", "ppl")


@dataclass(frozen=True)
class CompareRow:
    """One measured precision, flattened for tables and plots."""

    precision: str
    label: str
    family: Family
    mode: SupportMode
    weight_bytes: int | None
    peak_bytes: int | None  # the job's host RSS peak
    plan_bytes: int | None
    prefill_tok_s: float | None
    prefill_sd: float | None
    decode_tok_s: float | None
    decode_sd: float | None
    ttft_s: float | None
    roofline_pct: float | None
    kld: float | None
    top1_pct: float | None
    ppl: float | None
    ppl_ref: float | None
    reference_quantized: bool
    engine: str = ""  # vllm, llama.cpp, transformers, openai-api
    fallback: bool = False  # transformers fallback: weights dequantized, not serving speed
    peak_gpu_bytes: int | None = None  # NVML: the job's GPU memory (VRAM, or its share of the unified pool)
    roofline_suspect: bool = False  # above 100 %: the bound or the bytes per token is wrong, not a fact

    @property
    def memory_bytes(self) -> int | None:
        return self.weight_bytes


def row_from_result(result: StoredResult) -> CompareRow:
    r = result.record
    q, speed = r.quality, r.speed
    precision = BY_KEY.get(result.precision)
    return CompareRow(
        precision=result.precision if precision else f"{result.precision}:{result.id}",
        label=precision.label if precision else r.precision_label,
        family=r.family, mode=r.engine.mode, weight_bytes=r.memory.weight_bytes,
        peak_bytes=r.memory.peak_rss_bytes, plan_bytes=r.memory.planned_total_bytes,
        prefill_tok_s=speed.prefill_tok_s.mean if speed and speed.prefill_tok_s.n else None,
        prefill_sd=speed.prefill_tok_s.sd if speed and speed.prefill_tok_s.n else None,
        decode_tok_s=speed.decode_tok_s.mean if speed else None, decode_sd=speed.decode_tok_s.sd if speed else None,
        ttft_s=speed.ttft_s.mean if speed and speed.ttft_s.n else None, roofline_pct=r.roofline_pct,
        kld=q.kld_mean if q else None, top1_pct=q.same_top1_pct if q else None,
        ppl=q.ppl if q else None, ppl_ref=q.ppl_ref if q else None,
        reference_quantized=r.model.stored_quantized,
        engine=str(r.engine.name) if r.engine.name else "", fallback=r.engine.is_fallback,
        peak_gpu_bytes=r.memory.peak_gpu_bytes, roofline_suspect=r.roofline_note is not None,
    )


def sort_rows(rows: list[CompareRow], key: str) -> list[CompareRow]:
    order = {p.key: i for i, p in enumerate(BY_KEY.values())}
    getters = {
        "precision": lambda r: order.get(r.precision, 99),
        "memory": lambda r: r.memory_bytes if r.memory_bytes is not None else float("inf"),
        "decode": lambda r: -(r.decode_tok_s or 0.0),
        "kld": lambda r: r.kld if r.kld is not None else float("inf"),
        "top1": lambda r: -(r.top1_pct or 0.0),
        "ppl": lambda r: r.ppl if r.ppl is not None else float("inf"),
    }
    return sorted(rows, key=getters[key])


def filter_rows(rows: list[CompareRow], family: str) -> list[CompareRow]:
    return rows if family == "all" else [r for r in rows if r.family == family]


def pareto_front(rows: list[CompareRow]) -> list[CompareRow]:
    """Rows no other row beats on both memory and KLD (lower is better for both)."""
    points = [r for r in rows if r.memory_bytes is not None and r.kld is not None]
    front = []
    for row in points:
        dominated = any(
            other is not row and other.memory_bytes <= row.memory_bytes and other.kld <= row.kld
            and (other.memory_bytes < row.memory_bytes or other.kld < row.kld)
            for other in points
        )
        if not dominated:
            front.append(row)
    return sorted(front, key=lambda r: r.memory_bytes or 0)


@dataclass(frozen=True)
class Recommendation:
    precision: str | None
    label: str
    text: str
    runner_up: str | None
    priority: Priority


def _native(row: CompareRow, precision: Precision, hardware: Hardware) -> bool:
    return precision.support(hardware).mode == SupportMode.NATIVE


def _need(row: CompareRow) -> int | None:
    return row.plan_bytes or row.peak_bytes or row.weight_bytes


def recommend(rows: list[CompareRow], hardware: Hardware, headroom_bytes: int | None,
              priority: Priority = Priority.QUALITY) -> Recommendation:
    priority = Priority(priority)
    measured = [r for r in rows if r.precision in BY_KEY]
    if not measured:
        return Recommendation(None, "nothing measured", "Run some precisions first (p, select, r).", None, priority)

    def fits(row: CompareRow) -> bool:
        need = _need(row)
        return headroom_bytes is None or need is None or need <= headroom_bytes

    cpu_pool = not hardware.cuda or priority == Priority.CPU
    if cpu_pool:
        pool = [r for r in measured if r.precision in CPU_POOL]
        why_pool = ("no GPU here, so llama.cpp with a GGUF K-quant of 4 bits or more"
                    if not hardware.cuda else "for CPU or hybrid serving, llama.cpp with a GGUF K-quant")
        if not pool:
            pool = [r for r in measured if r.family == Family.GGUF] or measured
    else:
        pool = [r for r in measured if BY_KEY[r.precision].quantized and r.family == Family.TORCH
                and _native(r, BY_KEY[r.precision], hardware)]
        why_pool = f"on {hardware.label}, a vLLM-servable precision with native kernels"
        if not pool:
            pool = [r for r in measured if r.family == Family.TORCH] or measured
    fitting = [r for r in pool if fits(r)]
    excluded = [r for r in pool if not fits(r)]
    if not fitting:
        smallest = min(pool, key=lambda r: _need(r) or 0)
        return Recommendation(None, "none fits", (
            f"None of the measured candidates fits the {format_bytes(headroom_bytes)} of headroom; the smallest, "
            f"{smallest.label}, needs {format_bytes(_need(smallest))}. Free memory or measure a smaller precision."
        ), None, priority)

    def kld(row: CompareRow) -> float:
        return row.kld if row.kld is not None else float("inf")

    acceptable = [r for r in fitting if kld(r) <= ACCEPTABLE_KLD] or fitting
    if priority in (Priority.QUALITY, Priority.CPU):
        ranked = sorted(fitting, key=lambda r: (kld(r), r.memory_bytes or 0))
    elif priority == Priority.MEMORY:
        ranked = sorted(acceptable, key=lambda r: (r.memory_bytes or 0, kld(r)))
    else:  # a fallback's tokens/s is not serving speed: serving engines rank first
        ranked = sorted(acceptable, key=lambda r: (r.fallback, -(r.decode_tok_s or 0.0), kld(r)))
    best = ranked[0]
    runner = ranked[1] if len(ranked) > 1 else None
    sentences = [f"{best.label}: {_facts(best)}; chosen for {priority} ({why_pool})."]
    if excluded:
        sentences.append(
            "Left out because they do not fit the live headroom of "
            f"{format_bytes(headroom_bytes)}: " + ", ".join(f"{r.label} ({format_bytes(_need(r))})" for r in excluded)
            + ".")
    if runner is not None:
        sentences.append(f"Runner-up {runner.label}: {_delta(best, runner)}.")
    if best.reference_quantized:
        sentences.append("The reference itself was quantized, so small KLD differences are within its own error.")
    return Recommendation(best.precision, best.label, " ".join(sentences), runner.precision if runner else None,
                          priority)


def _facts(row: CompareRow) -> str:
    parts = [f"{format_bytes(row.memory_bytes)} of weights"]
    if row.kld is not None:
        parts.append(f"KLD {row.kld:.4f}")
    if row.top1_pct is not None:
        parts.append(f"top-1 {row.top1_pct:.1f} %")
    if row.decode_tok_s is not None:
        parts.append(f"{row.decode_tok_s:.1f} tok/s decode" + (f" ({row.engine})" if row.engine else ""))
    if row.fallback:
        parts.append("speed from the transformers fallback, not serving speed")
    if row.mode == SupportMode.EMULATED:
        parts.append("emulated here")
    return ", ".join(parts)


def _delta(best: CompareRow, other: CompareRow) -> str:
    parts = []
    if best.memory_bytes is not None and other.memory_bytes is not None:
        diff = other.memory_bytes - best.memory_bytes
        if diff == 0:
            parts.append("the same memory")
        else:
            parts.append(f"{'saves' if diff < 0 else 'costs'} {format_bytes(abs(diff))} of memory")
    if best.kld is not None and other.kld is not None:
        parts.append(f"KLD {other.kld:.4f} instead of {best.kld:.4f}")
    if best.decode_tok_s and other.decode_tok_s:
        parts.append(f"{other.decode_tok_s - best.decode_tok_s:+.1f} tok/s decode")
    return ", ".join(parts) or "no measured difference"
