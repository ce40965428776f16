"""Compare measured precisions: rows, sorting, the Pareto frontier and a recommendation.

The recommendation is chosen from the measured table. Per priority, every
measured precision that fits the live headroom and is served here (not a
transformers fallback, not emulated - those figures are not what a user would
serve) is a candidate, ranked by the measured numbers:

* quality first → the lowest KLD, with a task veto: a precision whose task accuracy fell significantly below the
  reference's on the same items (exact McNemar, core.tasks.summary) is not recommended, whatever its KLD;
* memory first  → the smallest weights whose KLD is acceptable (≤ 0.1, about Q3_K_M);
* speed first   → the fastest measured decode whose KLD is acceptable;
* CPU / hybrid  → the fastest decode among the GGUF files (llama.cpp serves them on the CPU,
  or split between CPU and GPU) whose KLD is acceptable;
* serving       → the most output tok/s within the service objective (a load sweep's goodput,
  core.load_capacity) among the precisions whose quality holds: KLD acceptable and no significant task loss.
  Goodputs tie within 2 standard errors of their difference or 2 %, as decode speeds do.

The seed's decision framework (FACTS §5) never removes a candidate: it breaks
ties - measurements closer than they can tell apart - and explains the choice.
Two KLDs tie when they differ by less than ``max(2 × the standard error of
their difference, KLD_TIE)``: the first is the sampling error of the
measurement, the second a floor for what it cannot see - the corpus, and a
reference that is itself quantized (the bundled model's is a dequantized Q4_1).
0.005 is Q8_0's to Q6_K's KLD in FACTS §4 (0.0014 / 0.0055 on LLaMA-3-8B), a
tenth of the step down to Q4_K_M (0.031): neighbours inside it are not told
apart, the step to 4 bits always is. Two rows measured against the same reference were scored on the same
positions, so the standard error of their difference is the paired one (the spread of the per-position
differences ÷ √n, :func:`paired_kld_se`), far smaller than the two SEs combined as if independent; rows without
per-position KLDs (older results) fall back to the independent sum. Two decode speeds tie by the same rule: within two standard errors
of their difference (each mean's sd / √repetitions), or 2 %. Within a tie the framework orders: FP8 on FP8 tensor cores
(quality, Ada / Hopper / Blackwell), AWQ then GPTQ (memory, and quality on
older GPUs), GGUF Q4_K_M / Q5_K_M then Q6_K on a CPU, quantized before the
unquantized reference, 4 bits or more before 2-3 bits; then the smaller file.

The result names one precision, says why in sentences with the numbers, what
the runner-up would cost or save, and which figures were measured on a busy
host (noisy).
"""

from __future__ import annotations

import base64
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, replace

from qexplorer.core.domain.bench import known
from qexplorer.core.domain.record import QualityStats
from qexplorer.core.kinds import Family, Priority, SupportMode
from qexplorer.core.load_capacity import LoadCapacity, capacity_from_sweep, capacity_text, goodput_tied
from qexplorer.core.precisions import BY_KEY, Hardware
from qexplorer.core.quality import DEFAULT_TOP_K, kld_name
from qexplorer.core.results import ComparedResults, StoredResult
from qexplorer.core.serving.vllm_kernels import mismatch
from qexplorer.core.tasks.stats import ALPHA, paired_mean_difference
from qexplorer.core.tasks.summary import TaskAccuracy, summarize, task_title
from qexplorer.core.units import format_bytes

ACCEPTABLE_KLD = 0.1
KLD_TIE = 0.005
SPEED_TIE_PCT = 2.0
PRIORITIES = tuple(Priority)
CPU_FRAMEWORK = ("q4_k_m", "q5_k_m", "q6_k")  # FACTS §5: GGUF K-quants of 4 bits or more, Q4_K_M / Q5_K_M first
INT4_FRAMEWORK = ("awq", "gptq")  # memory-constrained, and older GPUs without FP8
SORT_KEYS = ("precision", "memory", "decode", "kld", "top1", "ppl")


@dataclass(frozen=True)
class DepthSpeed:
    depth: int
    prefill_tok_s: float | None
    decode_tok_s: float
    decode_sd: float
    noisy: bool
    roofline_pct: float | None = None  # against this depth's bytes per token (weights + its KV cache)


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
    kld_se: float | None = None  # standard error of the mean KLD
    noise: str | None = None  # why a speed figure of this row is noisy (busy host, spread); None: measured quiet
    depths: tuple[DepthSpeed, ...] = ()  # decode / prefill at the context depths after the first
    depth: int = 0  # the context depth of the main speed figures
    compared: bool = True  # measured with the compared settings (results.compare_groups); else shown, never ranked
    settings: str = ""  # those settings in words
    decode_n: int = 0  # repetitions behind decode_tok_s (its standard error is decode_sd / √n)
    kernel_mismatch: str | None = None  # vLLM picked another kernel than the plan expected (one sentence)
    first_pass: bool = False  # the quick first answer: its full figures are still being measured
    is_reference: bool = False  # the reference precision itself: its KLD and top-1 are by definition, not measured
    top1_se_pct: float | None = None
    ppl_se: float | None = None
    kld_top_k: int = DEFAULT_TOP_K
    # the standard error of (this KLD − another row's), paired position by position: (precision, SE) per row
    # measured against the same reference (:func:`paired_kld_se`)
    kld_paired_se: tuple[tuple[str, float], ...] = ()
    tasks: tuple[TaskAccuracy, ...] = ()  # task accuracy in the serving engine, with the paired tests
    task_error: str | None = None  # the task pass failed: why (the row's other figures stand)
    load: LoadCapacity | None = None  # streams within the objective and tok/s by concurrency; None: no load sweep

    def task(self, name: str) -> TaskAccuracy | None:
        return next((t for t in self.tasks if t.task == name), None)

    def task_loss(self) -> TaskAccuracy | None:
        """The first task whose accuracy fell significantly below the reference's on the same items. With several
        tasks the veto holds each to α ÷ their number (Bonferroni), so that testing two tasks does not double the
        chance of vetoing a precision that lost nothing; the p-values shown stay each test's own."""
        tested = [t for t in self.tasks if t.versus_reference is not None]
        alpha = ALPHA / max(1, len(tested))
        return next((t for t in tested if t.versus_reference.p_value < alpha
                     and (t.versus_reference.difference or 0.0) < 0), None)

    @property
    def memory_bytes(self) -> int | None:
        return self.weight_bytes


def row_from_result(result: StoredResult, compared: bool = True) -> CompareRow:
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
        kld=known(q.kld_mean) if q else None, top1_pct=known(q.same_top1_pct) if q else None,
        ppl=known(q.ppl) if q else None, ppl_ref=known(q.ppl_ref) if q else None,
        reference_quantized=r.model.stored_quantized,
        engine=str(r.engine.name) if r.engine.name else "", fallback=r.engine.is_fallback,
        peak_gpu_bytes=r.memory.peak_gpu_bytes, roofline_suspect=r.roofline_note is not None,
        kld_se=known(q.kld_se) if q else None, depth=speed.depth if speed else 0,
        noise=next((s.noise.reason for s in (speed, *r.depth_speeds) if s is not None and s.noisy and s.noise), None),
        depths=tuple(DepthSpeed(s.depth, s.prefill_tok_s.mean if s.prefill_tok_s.n else None, s.decode_tok_s.mean,
                                s.decode_tok_s.sd, s.noisy, roof) for s, roof in zip(
            r.depth_speeds, r.depth_rooflines or (None,) * len(r.depth_speeds), strict=True)),
        decode_n=speed.decode_tok_s.n if speed else 0,
        compared=compared, settings=r.settings_text(),
        kernel_mismatch=mismatch(r.engine.expected_kernel, r.engine.kernel), first_pass=r.first_pass,
        is_reference=r.is_quality_reference, top1_se_pct=known(q.same_top1_se_pct) if q else None,
        ppl_se=known(q.ppl_se) if q else None, task_error=r.task_error,
        kld_top_k=q.reference.top_k if q and q.reference and q.reference.top_k else DEFAULT_TOP_K,
        load=capacity_from_sweep(r.server),
    )


def _positions(quality: QualityStats | None) -> array | None:
    if quality is None or not quality.kld_positions:
        return None
    values = array("f")
    try:
        values.frombytes(base64.b64decode(quality.kld_positions, validate=True))
    except ValueError:  # damaged: no pairing, the independent SEs stand
        return None
    if sys.byteorder == "big":  # stored little-endian (quality.encode_positions)
        values.byteswap()
    return values if len(values) == quality.n_positions else None


def _same_positions(a: QualityStats, b: QualityStats) -> bool:
    ra, rb = a.reference, b.reference
    return (ra is not None and rb is not None and a.n_positions == b.n_positions
            and (ra.precision, ra.corpus_sha256, ra.n_tokens, ra.ctx, ra.top_k, ra.chunking)
            == (rb.precision, rb.corpus_sha256, rb.n_tokens, rb.ctx, rb.top_k, rb.chunking))


def paired_kld_se(a: QualityStats, b: QualityStats) -> float | None:
    """The standard error of mean KLD(a) − mean KLD(b) from the per-position differences; None when the two were
    not scored on the same positions of the same reference (or either lacks its per-position figures)."""
    if not _same_positions(a, b):
        return None
    xa, xb = _positions(a), _positions(b)
    if xa is None or xb is None or len(xa) < 2:
        return None
    return paired_mean_difference(xa, xb).standard_error


def reference_precision(results: Sequence[StoredResult], default: str = "bf16") -> str:
    """The precision the rows' quality was measured against (the newest row's that says)."""
    for result in reversed(results):
        quality = result.record.quality
        if quality is not None and quality.reference is not None:
            return quality.reference.precision
    return default


def rows_from_results(compared: ComparedResults, servers: Sequence[StoredResult] = ()) -> tuple[CompareRow, ...]:
    """The compare table's rows: the compared group (ranked together), the precisions measured only with other
    settings (shown, never ranked), then served models; each row with its task accuracy and paired tests
    (:func:`~qexplorer.core.tasks.summary.summarize` over the compared group) and its paired KLD standard errors
    against every other row scored on the same positions."""
    ranked = sorted(compared.rows, key=lambda r: r.created_at)
    tasks = summarize([r.record for r in ranked], reference_precision(ranked))
    group = {result.id: row_from_result(result) for result in compared.rows}
    paired: dict[int, list[tuple[str, float]]] = {result.id: [] for result in compared.rows}
    for i, a in enumerate(compared.rows):  # each pair once: the SE of a − b is that of b − a
        for b in compared.rows[i + 1:]:
            if a.record.quality is not None and b.record.quality is not None:
                se = paired_kld_se(a.record.quality, b.record.quality)
                if se is not None:
                    paired[a.id].append((group[b.id].precision, se))
                    paired[b.id].append((group[a.id].precision, se))
    rows = [replace(group[r.id], kld_paired_se=tuple(paired[r.id]),
                    tasks=tuple(t for t in tasks if t.precision == r.precision)) for r in compared.rows]
    rows += [row_from_result(r, compared=False) for r in compared.others]
    rows += [row_from_result(r) for r in servers]
    return tuple(rows)


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
    points = [r for r in rows if r.compared and r.memory_bytes is not None and r.kld is not None]
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


def _need(row: CompareRow) -> int | None:
    return row.plan_bytes or row.peak_bytes or row.weight_bytes


def _kld(row: CompareRow) -> float:
    return row.kld if row.kld is not None else float("inf")


def kld_difference_se(a: CompareRow, b: CompareRow) -> float:
    """The standard error of a.kld − b.kld: paired where the two were scored on the same positions, else the two
    SEs combined as if independent (an upper bound: the same positions are hard for both)."""
    paired = dict(a.kld_paired_se).get(b.precision)
    if paired is not None:
        return paired
    return ((a.kld_se or 0.0) ** 2 + (b.kld_se or 0.0) ** 2) ** 0.5


def kld_tied(a: CompareRow, b: CompareRow) -> bool:
    """The two KLDs are closer than the measurement can tell apart (see the module's note)."""
    if a.kld is None or b.kld is None:
        return a.kld is None and b.kld is None
    return abs(a.kld - b.kld) <= max(2 * kld_difference_se(a, b), KLD_TIE)


def _se(sd: float | None, n: int) -> float:
    """The standard error of a mean of n repetitions; the sd itself where n is unknown (a legacy row)."""
    return (sd or 0.0) / n ** 0.5 if n > 0 else (sd or 0.0)


def speed_tied(a: CompareRow, b: CompareRow) -> bool:
    if a.decode_tok_s is None or b.decode_tok_s is None:
        return a.decode_tok_s is None and b.decode_tok_s is None
    se = (_se(a.decode_sd, a.decode_n) ** 2 + _se(b.decode_sd, b.decode_n) ** 2) ** 0.5
    return abs(a.decode_tok_s - b.decode_tok_s) <= max(2 * se, SPEED_TIE_PCT / 100 * max(a.decode_tok_s,
                                                                                         b.decode_tok_s))


def served_here(row: CompareRow, hardware: Hardware) -> bool:
    """Its figures are the served artifact's on a serving engine, with the kernels this hardware has."""
    precision = BY_KEY[row.precision]
    return (not row.fallback and row.mode in (SupportMode.NATIVE, SupportMode.SERVED)
            and precision.support(hardware).mode == SupportMode.NATIVE)


def framework_rank(row: CompareRow, hardware: Hardware, priority: Priority) -> int:
    """FACTS §5 as an order (lower first), used only to break ties between measurements."""
    precision = BY_KEY[row.precision]
    if precision.weight_bits < 4 and precision.quantized:
        return 9  # below 4 bits quality drops sharply: shown, never preferred
    if not precision.quantized:
        return 8  # the reference: when a quantized precision ties with it, the quantized one saves memory
    if not hardware.cuda or priority == Priority.CPU:
        if row.precision in CPU_FRAMEWORK:
            return CPU_FRAMEWORK.index(row.precision)
        return 3 if row.family == Family.GGUF else 4
    fp8_cores = hardware.compute_capability is not None and hardware.compute_capability >= (8, 9)
    if priority == Priority.QUALITY and row.precision == "fp8" and fp8_cores:
        return 0
    if row.precision in INT4_FRAMEWORK:
        return 1 + INT4_FRAMEWORK.index(row.precision)
    return 3 if row.family == Family.TORCH else 4


def _first_of_tie(ranked: list[CompareRow], tied, hardware: Hardware,
                  priority: Priority) -> tuple[list[CompareRow], list[CompareRow]]:
    """``ranked`` with its head replaced by the framework's choice among the rows tied with the measured best,
    and the others of that tie."""
    group = [r for r in ranked if tied(ranked[0], r)]
    best = min(group, key=lambda r: (framework_rank(r, hardware, priority), group.index(r)))
    return [best] + [r for r in ranked if r is not best], [r for r in group if r is not best]


def recommend(rows: list[CompareRow], hardware: Hardware, headroom_bytes: int | None,
              priority: Priority = Priority.QUALITY) -> Recommendation:
    priority = Priority(priority)
    measured = [r for r in rows if r.precision in BY_KEY and r.compared]  # other settings are never ranked
    if not measured:
        return Recommendation(None, "nothing measured", "Run some precisions first (p, select, r).", None, priority)

    def fits(row: CompareRow) -> bool:
        need = _need(row)
        return headroom_bytes is None or need is None or need <= headroom_bytes

    pool = [r for r in measured if served_here(r, hardware)]
    among = "measured precisions that fit and run natively here"
    if not pool:
        pool, among = measured, "measured precisions that fit (none runs natively here: fallbacks only)"
    if priority == Priority.CPU:
        gguf = [r for r in pool if r.family == Family.GGUF]
        if gguf:
            pool, among = gguf, "measured GGUF files that fit (llama.cpp serves them on a CPU or split with a GPU)"
    if priority == Priority.SERVING:  # a load sweep's goodput is serving throughput only on a serving engine
        pool = [r for r in measured if served_here(r, hardware)]
        among = "measured precisions that fit, run natively here"
    fitting = [r for r in pool if fits(r)]
    excluded = [r for r in pool if not fits(r)]
    if priority == Priority.SERVING:
        return _recommend_serving(fitting, excluded, among, hardware, headroom_bytes)
    if not fitting:
        smallest = min(pool, key=lambda r: _need(r) or 0)
        return Recommendation(None, "none fits", (
            f"None of the measured candidates fits the {format_bytes(headroom_bytes)} of headroom; the smallest, "
            f"{smallest.label}, needs {format_bytes(_need(smallest))}. Free memory or measure a smaller precision."
        ), None, priority)

    acceptable = [r for r in fitting if _kld(r) <= ACCEPTABLE_KLD] or fitting
    tie: list[CompareRow] = []
    vetoed: list[CompareRow] = []
    all_vetoed = False
    if priority == Priority.QUALITY:
        vetoed = [r for r in fitting if r.task_loss() is not None]
        kept = [r for r in fitting if r.task_loss() is None]
        if not kept:  # every candidate lost: the veto cannot choose, KLD does (said below)
            kept, vetoed, all_vetoed = fitting, [], True
        ranked, tie = _first_of_tie(sorted(kept, key=lambda r: (_kld(r), r.memory_bytes or 0)), kld_tied,
                                    hardware, priority)
        basis = "the lowest measured KLD" + (" without a significant task loss" if vetoed else "")
    elif priority == Priority.MEMORY:
        ranked = sorted(acceptable, key=lambda r: (r.memory_bytes or 0, _kld(r)))
        basis = f"the smallest weights with KLD ≤ {ACCEPTABLE_KLD}"
    else:  # a noisy speed is not evidence: quiet measurements rank first
        quiet_first = sorted(acceptable, key=lambda r: (r.noise is not None, -(r.decode_tok_s or 0.0)))
        ranked, tie = _first_of_tie(quiet_first, speed_tied, hardware, priority)
        basis = f"the fastest measured decode with KLD ≤ {ACCEPTABLE_KLD}"
    best = ranked[0]
    runner = ranked[1] if len(ranked) > 1 else None
    sentences = [f"{best.label}: {_facts(best)}; {basis} among the {len(fitting)} {among}."]
    if priority == Priority.QUALITY and all_vetoed:
        sentences.append("Every candidate lost task accuracy significantly against the reference, so the task veto "
                         "cannot choose: ranked by KLD alone.")
    elif priority == Priority.QUALITY:
        sentences.extend(_task_sentences(best, fitting, vetoed))
    if tie:
        sentences.append("Tied within the measurement with " + ", ".join(r.label for r in tie)
                         + "; the decision framework (FACTS §5) breaks the tie.")
    if excluded:
        sentences.append(
            "Left out because they do not fit the live headroom of "
            f"{format_bytes(headroom_bytes)}: " + ", ".join(f"{r.label} ({format_bytes(_need(r))})" for r in excluded)
            + ".")
    if runner is not None:
        sentences.append(f"Runner-up {runner.label}: {_delta(best, runner)}.")
    noisy = [r.label for r in (best, runner) if r is not None and r.noise]
    if noisy:
        sentences.append(f"Measured on a busy host (noisy), re-run before trusting the speed: {', '.join(noisy)}.")
    if best.reference_quantized:
        sentences.append("The reference itself was quantized, so small KLD differences are within its own error.")
    return Recommendation(best.precision, best.label, " ".join(sentences), runner.precision if runner else None,
                          priority)


def _loss_text(row: CompareRow) -> str:
    loss = row.task_loss()
    assert loss is not None and loss.versus_reference is not None
    test = loss.versus_reference
    return (f"{row.label}'s {task_title(loss.task)} fell {abs(test.difference or 0.0):.1%} below "
            f"{BY_KEY[test.against].label if test.against in BY_KEY else test.against}'s on the same {test.n} items "
            f"(exact McNemar p = {test.p_value:.3g})")


def _task_sentences(best: CompareRow, fitting: list[CompareRow], vetoed: list[CompareRow]) -> list[str]:
    """Which figure decided: KLD alone, or the task veto (a significant task loss removes a candidate)."""
    if vetoed:
        by_kld = min(fitting, key=lambda r: (_kld(r), r.memory_bytes or 0))
        if by_kld in vetoed:
            return [f"The task veto decided: {by_kld.label} has the lowest KLD, but {_loss_text(by_kld)}."]
        return ["Left out by the task veto: " + "; ".join(_loss_text(r) for r in vetoed) + ". KLD decided."]
    measured = [t for r in fitting for t in r.tasks if t.versus_reference is not None]
    if not measured:
        return []
    names = sorted({task_title(t.task) for t in measured})
    return [f"KLD decided; no precision lost task accuracy significantly against the reference "
            f"({', '.join(names)}, exact McNemar, α = 0.05)."]


NO_LOAD_SWEEP = ("No precision has a load sweep yet: run with --load (qexplorer bench-server URL --load, or a run "
                 "with the load sweep) to measure how many streams each serves within the service objective.")


def quality_problem(row: CompareRow) -> str | None:
    """Why a row's quality does not hold for the serving priority, as one clause; None when it holds: a measured
    KLD ≤ ACCEPTABLE_KLD (the reference's own row by definition) and no significant task loss."""
    if not row.is_reference:
        if row.kld is None:
            return f"{row.label}'s KLD was not measured"
        if row.kld > ACCEPTABLE_KLD:
            return f"{row.label}'s {kld_name(row.kld_top_k)} {row.kld:.4f} is above {ACCEPTABLE_KLD}"
    return _loss_text(row) if row.task_loss() is not None else None


def _goodput(row: CompareRow) -> float:
    """The ranking figure: output tok/s within the objective; −1 where no concurrency met it (or no sweep)."""
    load = row.load
    return load.output_tok_s if load and load.streams is not None and load.output_tok_s is not None else -1.0


def _short_capacity(load: LoadCapacity) -> str:
    if load.streams is None or load.output_tok_s is None:
        return "none"
    return f"{load.streams} at {load.output_tok_s:.1f}"


def _recommend_serving(fitting: list[CompareRow], excluded: list[CompareRow], among: str, hardware: Hardware,
                       headroom_bytes: int | None) -> Recommendation:
    """Serving first: the highest goodput among the rows whose quality holds; the text names the figure that
    decided and every row passed over (quality, no sweep, memory)."""
    priority = Priority.SERVING
    not_fitting = ("Left out because they do not fit the live headroom of " f"{format_bytes(headroom_bytes)}: "
                   + ", ".join(f"{r.label} ({format_bytes(_need(r))})" for r in excluded) + ".") if excluded else ""
    swept = [r for r in fitting if r.load is not None]
    if not swept and any(r.load is not None for r in excluded):  # swept, but none fits the headroom now
        return Recommendation(None, "none fits", "Every precision with a load sweep needs more memory than is free "
                              "now. " + not_fitting, None, priority)
    if not swept:
        return Recommendation(None, "no load sweep", " ".join(filter(None, (NO_LOAD_SWEEP, not_fitting))), None,
                              priority)
    dropped = [r for r in swept if quality_problem(r) is not None]
    holds = [r for r in swept if r not in dropped]
    if not holds:
        return Recommendation(None, "quality does not hold", (
            "No precision with a load sweep keeps its quality (KLD ≤ "
            f"{ACCEPTABLE_KLD} and no significant task loss): " + "; ".join(map(quality_problem, dropped))
            + ". Measure its quality, or sweep a precision closer to the reference."), None, priority)
    ranked = sorted(holds, key=lambda r: (-_goodput(r), r.memory_bytes or 0))
    if ranked[0].load.streams is None:
        return Recommendation(None, "none within the objective", (
            "No precision whose quality holds meets its objective at any concurrency tested: "
            + "; ".join(f"{r.label} {r.load.sentence}" for r in ranked)
            + ". Relax the objective (--slo-ttft-p99, --slo-itl-p99) or serve on a larger machine."), None, priority)
    ranked, tie = _first_of_tie(ranked, lambda a, b: goodput_tied(a.load, b.load), hardware, priority)
    best, runner = ranked[0], (ranked[1] if len(ranked) > 1 else None)
    sentences = [f"{best.label} serves {capacity_text(best.load)} within {best.load.objective}"
                 + "".join(f"; {r.label} {_short_capacity(r.load)}" for r in ranked[1:]) + "."]
    sentences.append(f"{best.label}: {_facts(best)}; the most output tok/s within the objective (goodput) among "
                     f"the {len(holds)} {among} and keep their quality (KLD ≤ {ACCEPTABLE_KLD}, no significant "
                     "task loss).")
    top = max(dropped, key=_goodput, default=None)
    if top is not None and _goodput(top) > _goodput(best):
        sentences.append(f"Quality decided: {top.label} serves more ({capacity_text(top.load)}), but "
                         f"{quality_problem(top)}.")
        dropped = [r for r in dropped if r is not top]
    rest = dropped
    if rest:
        sentences.append("Passed over because their quality does not hold: " + "; ".join(
            f"{quality_problem(r)} ({capacity_text(r.load)})" for r in rest) + ".")
    objectives = {r.load.objective for r in swept}
    if len(objectives) > 1:
        sentences.append("Measured under different objectives, so these goodputs do not compare: " + "; ".join(
            f"{r.label} {r.load.objective}" for r in swept) + ". Re-run the sweeps with one objective.")
    if tie:
        sentences.append("Tied within the measurement with " + ", ".join(r.label for r in tie)
                         + "; the decision framework (FACTS §5) breaks the tie.")
    unswept = [r.label for r in fitting if r.load is None]
    if unswept:
        sentences.append(f"Not ranked, no load sweep: {', '.join(unswept)}.")
    if not_fitting:
        sentences.append(not_fitting)
    if runner is not None:
        gain = (f" ({_goodput(runner) - _goodput(best):+.1f} tok/s)" if runner.load.streams is not None else "")
        memory = _delta(best, replace(runner, kld=None, decode_tok_s=None))  # the memory part alone
        sentences.append(f"Runner-up {runner.label}: {capacity_text(runner.load)}{gain}, {memory}.")
    if best.load.streams == best.load.highest_tested:
        sentences.append(f"{best.label} met the objective at the highest concurrency tested ({best.load.streams}): "
                         "it may serve more; sweep higher levels.")
    if best.load.stopped_early:
        sentences.append(f"{best.label}'s sweep {best.load.stopped_early}.")
    return Recommendation(best.precision, best.label, " ".join(sentences), runner.precision if runner else None,
                          priority)


def _se_text(se: float | None, fmt: str) -> str:
    return f" ± {fmt.format(se)} SE" if se is not None else ""


def _facts(row: CompareRow) -> str:
    parts = [f"{format_bytes(row.memory_bytes)} of weights"]
    if row.is_reference:
        parts.append("the reference (KLD 0 and top-1 100 % by definition)")
    else:
        if row.kld is not None:
            parts.append(f"{kld_name(row.kld_top_k)} {row.kld:.4f}" + _se_text(row.kld_se, "{:.4f}"))
        if row.top1_pct is not None:
            parts.append(f"top-1 {row.top1_pct:.1f} %" + _se_text(row.top1_se_pct, "{:.1f}"))
    for task in row.tasks:
        if task.accuracy is not None:
            parts.append(f"{task_title(task.task)} {task.accuracy:.1%} [{task.low:.1%}, {task.high:.1%}]")
    if row.decode_tok_s is not None:
        parts.append(f"{row.decode_tok_s:.1f} tok/s decode" + (f" ({row.engine})" if row.engine else ""))
    if row.fallback:
        parts.append("speed from the transformers fallback, not serving speed")
    if row.mode == SupportMode.EMULATED:
        parts.append("emulated here")
    if row.mode == SupportMode.WEIGHT_ONLY:
        parts.append("served weight-only here (activations not quantized)")
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
        se = kld_difference_se(other, best) if (other.kld_se is not None or other.kld_paired_se) else None
        parts.append(f"KLD {other.kld:.4f} instead of {best.kld:.4f}"
                     + (f" (difference ± {se:.4f} SE{', paired' if dict(other.kld_paired_se).get(best.precision) is not None else ''})"
                        if se is not None else ""))
    if best.decode_tok_s and other.decode_tok_s:
        parts.append(f"{other.decode_tok_s - best.decode_tok_s:+.1f} tok/s decode")
    return ", ".join(parts) or "no measured difference"
