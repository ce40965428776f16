"""The results store: SQLite in the user's data dir, one row per job.

Identity columns (model, precision, backend, status, time) are real columns;
every measured figure lives in the ``record`` column as a
:class:`~qexplorer.core.domain.record.RunRecord` in JSON, so a new metric is a
new field of that record and needs no table change. ``PRAGMA user_version``
holds the schema: bump ``SCHEMA_VERSION`` and add a step to ``MIGRATIONS``
(SQL) or ``REWRITES`` (a Python rewrite of each record) when either changes.
Schema 1 stored flat dictionaries; opening such a store rewrites each row as a
schema-2 record once.

Only the parent process writes here (the worker never opens the store), so a
worker killed mid-run cannot damage it. A locked or damaged store is reported
in one sentence and the app carries on without losing the rows it can read.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qexplorer.core.domain.bench import Stat, known
from qexplorer.core.domain.record import RunRecord, TaskScore, record_from_legacy
from qexplorer.core.errors import UserError
from qexplorer.core.kinds import JobStatus, SupportMode
from qexplorer.core.load_capacity import capacity_from_sweep
from qexplorer.core.precisions import BY_KEY
from qexplorer.core.quality import DEFAULT_TOP_K, kld_name
from qexplorer.core.tasks.stats import wilson
from qexplorer.core.tasks.summary import TaskAccuracy, summarize, task_title, verdicts
from qexplorer.core.units import format_bytes

SCHEMA_VERSION = 2
MIGRATIONS = {
    1: """
    CREATE TABLE IF NOT EXISTS results (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at REAL NOT NULL,
        model_name TEXT NOT NULL,
        model_path TEXT NOT NULL,
        precision TEXT NOT NULL,
        family TEXT NOT NULL,
        backend TEXT,
        status TEXT NOT NULL,
        error TEXT,
        record TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS results_model ON results(model_path, precision);
    """,
    2: "",
}


def _rewrite_v2(record: dict[str, Any]) -> dict[str, Any]:
    return record_from_legacy(record).to_json()


REWRITES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {2: _rewrite_v2}


@dataclass(frozen=True)
class StoredResult:
    id: int
    created_at: float
    status: JobStatus
    error: str | None
    record: RunRecord

    @property
    def model_name(self) -> str:
        return self.record.model.name

    @property
    def model_path(self) -> str:
        return self.record.model.path

    @property
    def precision(self) -> str:
        return self.record.precision

    @property
    def family(self) -> str:
        return self.record.family


class ResultsStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def in_dir(cls, folder: Path) -> ResultsStore:
        return cls(folder / "results.sqlite3")

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        new = not self.path.exists()
        try:
            conn = sqlite3.connect(self.path, timeout=2.0)
            if new:
                os.chmod(self.path, 0o600)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for step in range(version + 1, SCHEMA_VERSION + 1):
                if MIGRATIONS[step]:
                    conn.executescript(MIGRATIONS[step])
                if step in REWRITES and version > 0:
                    _rewrite_rows(conn, REWRITES[step])
                conn.execute(f"PRAGMA user_version = {step}")
            if version > SCHEMA_VERSION:
                raise UserError(f"The results store {self.path} was written by a newer qexplorer "
                                f"(schema {version}); upgrade qexplorer to read it.")
            conn.commit()
            return conn
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                raise UserError(f"The results store {self.path} is locked by another process; "
                                "close it or try again.") from None
            raise UserError(f"The results store {self.path} cannot be opened ({exc}).") from None
        except sqlite3.DatabaseError as exc:
            raise UserError(f"The results store {self.path} is damaged ({exc}); move it aside to start "
                            "a fresh one.") from None

    def add(self, record: RunRecord, status: JobStatus = JobStatus.OK, error: str | None = None) -> int:
        conn = self._connect()
        try:
            with conn:
                cursor = conn.execute(
                    "INSERT INTO results (created_at, model_name, model_path, precision, family, backend, status,"
                    " error, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (time.time(), record.model.name, record.model.path, record.precision, str(record.family),
                     None if record.engine.name is None else str(record.engine.name), str(status), error,
                     record.dumps()),
                )
                return int(cursor.lastrowid or 0)
        finally:
            conn.close()

    def by_ids(self, ids: list[int]) -> list[StoredResult]:
        """Exactly these rows (failed ones included), in the order asked."""
        found = {r.id: r for r in self.all(include_failed=True, ids=ids)}
        return [found[i] for i in ids if i in found]

    def all(self, model_path: str | None = None, include_failed: bool = False,
            ids: list[int] | None = None) -> list[StoredResult]:
        conn = self._connect()
        try:
            query = "SELECT id, created_at, status, error, record FROM results"
            clauses: list[str] = []
            args: list[Any] = []
            if model_path:
                clauses.append("model_path = ?")
                args.append(model_path)
            if not include_failed:
                clauses.append("status = 'ok'")
            if ids is not None:
                clauses.append(f"id IN ({','.join('?' * len(ids))})")
                args.extend(ids)
            if clauses:
                query += " WHERE " + " AND ".join(clauses)
            rows = conn.execute(query + " ORDER BY id", args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise UserError(f"The results store {self.path} is damaged ({exc}); move it aside to start "
                            "a fresh one.") from None
        finally:
            conn.close()
        results = []
        for row_id, created_at, status, error, text in rows:
            try:
                record = RunRecord.from_json(json.loads(text))
                state = JobStatus(status)
            except (ValueError, TypeError):
                continue  # one damaged row does not hide the others
            results.append(StoredResult(row_id, created_at, state, error, record))
        return results

    def comparable(self, model_path: str | None = None) -> ComparedResults:
        """The newest result of each precision among those measured with the same settings as the newest one,
        and, apart, the precisions measured only with other settings (:meth:`RunRecord.settings_key`)."""
        return compare_groups(self.latest_per_key(model_path))

    def latest_per_key(self, model_path: str | None = None) -> list[StoredResult]:
        """The newest finished result per model, precision and settings, oldest first; a quick first answer
        (``first_pass``) only until a full result of its precision lands after it."""
        latest: dict[tuple[Any, ...], StoredResult] = {}
        full: dict[tuple[str, str], int] = {}
        for result in self.all(model_path):
            if result.status == JobStatus.OK and result.family != "server":
                latest[(result.model_path, result.precision, result.record.settings_key())] = result
                if not result.record.first_pass:
                    full[(result.model_path, result.precision)] = result.id
        shown = [r for r in latest.values()
                 if not (r.record.first_pass and full.get((r.model_path, r.precision), -1) > r.id)]
        return sorted(shown, key=lambda r: r.created_at)

    def latest_servers(self) -> list[StoredResult]:
        """The latest result of each served model (bench-server), whatever the local model."""
        latest: dict[str, StoredResult] = {}
        for result in self.all():
            if result.family == "server":
                latest[result.model_path] = result
        return list(latest.values())

    def integrity_ok(self) -> bool:
        conn = self._connect()
        try:
            return conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            conn.close()


@dataclass(frozen=True)
class ComparedResults:
    rows: tuple[StoredResult, ...]  # one per precision, all with the newest result's settings: ranked together
    others: tuple[StoredResult, ...]  # precisions measured only with other settings: shown marked, never ranked

    @property
    def all(self) -> list[StoredResult]:
        return [*self.rows, *self.others]


def compare_groups(results: list[StoredResult]) -> ComparedResults:
    """Group by settings; the group of the newest result is the one compared. ``results`` oldest first."""
    if not results:
        return ComparedResults((), ())
    key = results[-1].record.settings_key()
    rows: dict[tuple[str, str], StoredResult] = {}
    others: dict[tuple[str, str], StoredResult] = {}
    for result in results:
        which = rows if result.record.settings_key() == key else others
        which[(result.model_path, result.precision)] = result
    order = lambda r: (r.model_name, str(r.family), r.precision)  # noqa: E731
    return ComparedResults(tuple(sorted(rows.values(), key=order)),
                           tuple(sorted((r for k, r in others.items() if k not in rows), key=order)))


def _rewrite_rows(conn: sqlite3.Connection, rewrite: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Rewrite every record once (inside the migration's transaction); a row that cannot be read is left as is."""
    for row_id, text in conn.execute("SELECT id, record FROM results").fetchall():
        try:
            new = rewrite(json.loads(text))
        except (ValueError, TypeError, KeyError):
            continue
        conn.execute("UPDATE results SET record = ? WHERE id = ?", (json.dumps(new, separators=(",", ":")), row_id))


# --------------------------------------------------------------------- exports
def flat_row(result: StoredResult) -> dict[str, Any]:
    """One flat dict per result; names follow llama-bench's CSV where one exists."""
    r = result.record
    hw = r.hardware
    speed, quality, memory = r.speed, r.quality, r.memory
    load = capacity_from_sweep(r.server)
    return {
        "id": result.id, "model_name": result.model_name, "model_filename": result.model_path,
        "model_n_params": r.model.params, "precision": result.precision, "family": str(result.family),
        "backend": None if r.engine.name is None else str(r.engine.name), "mode": str(r.engine.mode),
        "engine_version": r.engine.version or None, "kernel": r.engine.kernel or None,
        "serve_command": r.engine.serve_command or None, "fallback_reason": r.engine.fallback_reason,
        "expected_kernel": r.engine.expected_kernel or None, "served_dtype": r.engine.dtype or None,
        "cuda_graphs": r.engine.graphs or None, "start_check": r.engine.start_check or None,
        "artifact_sha256": r.engine.artifact_sha256,
        "status": str(result.status), "error": result.error,
        "cpu_info": hw.cpu if hw else None, "gpu_info": hw.gpu if hw else None,
        "n_threads": speed.threads if speed else None,
        "n_prompt": speed.prompt_tokens if speed else None, "n_gen": speed.gen_tokens if speed else None,
        "repetitions": speed.repetitions if speed else None,
        "pp_avg_ts": speed.prefill_tok_s.known_mean if speed else None,
        "pp_stddev_ts": speed.prefill_tok_s.known_sd if speed else None,
        "tg_avg_ts": speed.decode_tok_s.known_mean if speed else None,
        "tg_stddev_ts": speed.decode_tok_s.known_sd if speed else None,
        "ttft_avg_s": speed.ttft_s.known_mean if speed else None, "ttft_stddev_s": speed.ttft_s.known_sd if speed else None,
        "n_depth": speed.depth if speed else None,
        "noisy": speed.noisy if speed else None,
        "noise_other_cpu_pct": speed.noise.other_cpu_pct if speed and speed.noise else None,
        "noise_busiest": speed.noise.busiest if speed and speed.noise else None,
        "noise_reason": speed.noise.reason if speed and speed.noise else None,
        "first_pass": r.first_pass,
        "depths": json.dumps([{"n_depth": s.depth, "pp_avg_ts": s.prefill_tok_s.known_mean,
                               "pp_stddev_ts": s.prefill_tok_s.known_sd, "tg_avg_ts": s.decode_tok_s.known_mean,
                               "tg_stddev_ts": s.decode_tok_s.known_sd, "noisy": s.noisy, "roofline_pct": roof}
                              for s, roof in zip(r.depth_speeds, r.depth_rooflines or (None,) * len(r.depth_speeds),
                                                 strict=True)]) if r.depth_speeds else None,
        "roofline_pct": r.roofline_pct, "roofline_note": r.roofline_note,
        "bandwidth_bytes_s": hw.bandwidth_bytes_s if hw else None,
        "bandwidth_source": hw.bandwidth_source if hw else None,
        "gpu_unified": hw.gpu_unified if hw else None, "shown_profile": hw.shown_profile if hw else None,
        "model_size": memory.weight_bytes, "resident_weight_bytes": memory.resident_weight_bytes,
        "peak_rss_bytes": memory.peak_rss_bytes, "peak_gpu_bytes": memory.peak_gpu_bytes,
        "peak_gpu_source": memory.peak_gpu_source, "torch_peak_allocated_bytes": memory.torch_peak_allocated_bytes,
        "torch_peak_reserved_bytes": memory.torch_peak_reserved_bytes,
        "planned_peak_bytes": memory.planned_peak_bytes, "planned_total_bytes": memory.planned_total_bytes,
        "load_s": r.timings.load_s, "quantize_s": r.timings.quantize_s, "quality_s": r.timings.quality_s,
        "shared_phases": ",".join(r.shared_phases) or None,
        "quality_reference": _reference_role(r),
        "kld_name": kld_name(quality.reference.top_k if quality.reference else DEFAULT_TOP_K) if quality else None,
        "kld_mean": known(quality.kld_mean) if quality else None,
        "kld_se": known(quality.kld_se) if quality else None,
        "same_top1_pct": known(quality.same_top1_pct) if quality else None,
        "same_top1_se_pct": known(quality.same_top1_se_pct) if quality else None,
        "ppl": known(quality.ppl) if quality else None, "ppl_se": known(quality.ppl_se) if quality else None,
        "ppl_ref": known(quality.ppl_ref) if quality else None,
        "engine_kld_mean": r.engine_quality.kld_mean if r.engine_quality else None,
        "engine_same_top1_pct": r.engine_quality.same_top1_pct if r.engine_quality else None,
        "task_scores": json.dumps([task_fields(t) for t in r.tasks]) if r.tasks else None,
        "task_error": r.task_error, "tasks_s": r.timings.tasks_s,
        # a load sweep's goodput at its first depth (core.load_capacity); None without one
        "goodput_streams": load.streams if load else None,
        "goodput_output_tok_s": load.output_tok_s if load else None,
        "slo": load.objective if load else None,
        "versions": json.dumps(r.versions, sort_keys=True),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(result.created_at)),
    }


def task_fields(score: TaskScore) -> dict[str, Any]:
    """One task's accuracy with its Wilson 95 % interval, flat (the exports; the paired tests across precisions
    are core.tasks.summary's)."""
    interval = wilson(score.passed, score.n)
    return {"task": score.name, "engine": score.engine, "template": score.template, "n": score.n,
            "passed": score.passed, "accuracy": interval.fraction, "wilson_low": interval.low,
            "wilson_high": interval.high,
            "per_length": [[a.length, a.n, a.passed] for a in score.per_length] or None}


def task_text(score: TaskScore) -> str:
    interval = wilson(score.passed, score.n)
    return (f"{score.name} {score.passed}/{score.n} = {100 * (interval.fraction or 0.0):.1f} % "
            f"(95 % CI {100 * interval.low:.1f}-{100 * interval.high:.1f} %, {score.template})")


def _grouped(results: list[StoredResult]) -> list[tuple[StoredResult, bool]]:
    """Each export's rows, and whether each was measured with the compared settings: the compared group first,
    then one row per precision measured only with other settings (:func:`compare_groups`)."""
    groups = compare_groups(sorted(results, key=lambda r: r.created_at))
    return [(r, True) for r in groups.rows] + [(r, False) for r in groups.others]


def _task_accuracy(results: list[StoredResult]) -> tuple[TaskAccuracy, ...]:
    """The compared group's task accuracy with recovery and the paired tests (core.tasks.summary)."""
    compared = [r for r, is_compared in _grouped(results) if is_compared]
    reference = next((r.record.quality.reference.precision for r in reversed(compared)
                      if r.record.quality is not None and r.record.quality.reference is not None), "bf16")
    return summarize([r.record for r in compared], reference)


def _paired_fields(row: TaskAccuracy) -> dict[str, Any]:
    return {"task": row.task, "recovery": row.recovery, **{
        f"{name}_{field}": getattr(test, field) if test else None
        for name, test in (("vs_reference", row.versus_reference), ("vs_previous", row.versus_previous))
        for field in ("against", "p_value", "difference", "detectable_difference", "verdict")}}


def _compared_rows(results: list[StoredResult]) -> list[dict[str, Any]]:
    tasks = _task_accuracy(results)
    return [{**flat_row(r), "compared": compared, "settings": r.record.settings_text(),
             "task_tests": json.dumps([_paired_fields(t) for t in tasks if t.precision == r.precision])
             if compared and r.record.tasks else None}
            for r, compared in _grouped(results)]


def to_csv(results: list[StoredResult]) -> str:
    rows = _compared_rows(results)
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def to_json(results: list[StoredResult]) -> str:
    accuracy = _task_accuracy(results)
    return json.dumps({"schema": "qexplorer.results/1", "results": _compared_rows(results),
                       "task_verdicts": [{"task": v.task, "n": v.n, "tells_apart": v.tells_apart, "text": v.text}
                                         for v in verdicts(accuracy)]}, indent=2)


def _pm(stat: Stat | None, fmt: str = "{:.1f}") -> str:
    if stat is None or stat.n == 0:
        return "n/a"
    return f"{fmt.format(stat.mean)} ± {fmt.format(stat.sd)}"


def to_markdown(results: list[StoredResult]) -> str:
    """The seed's table: Quantization | Memory | Throughput | Quality, with measured values; the rows measured
    with the newest result's settings first, any other row marked with its own settings."""
    grouped = _grouped(results)
    lines = ["| Quantization | Memory | Throughput | Quality |", "|---|---|---|---|"]
    for result, compared in grouped:
        r = result.record
        label = r.precision_label
        if r.engine.mode == SupportMode.EMULATED:
            label += " (emulated)"
        if r.engine.is_fallback and r.engine.mode == SupportMode.DEQUANTIZED:
            label += " (transformers fallback, weights dequantized - not serving speed)"
        elif r.engine.name is not None:
            label += f" ({r.engine.name})"
        memory = f"{format_bytes(r.memory.weight_bytes)} weights, {format_bytes(r.memory.peak_rss_bytes)} peak"
        roof = f", {r.roofline_pct:.0f} % of roofline" if r.roofline_pct else ""
        speed = r.speed
        throughput = (f"{_pm(speed.decode_tok_s if speed else None)} tok/s decode, "
                      f"{_pm(speed.prefill_tok_s if speed else None, '{:.0f}')} tok/s prefill{roof}")
        throughput += "".join(f"; at depth {s.depth}: {_pm(s.decode_tok_s)} tok/s decode, "
                              f"{_pm(s.prefill_tok_s, '{:.0f}')} tok/s prefill"
                              + (f", {roof:.0f} % of roofline" if roof else "")
                              for s, roof in zip(r.depth_speeds, r.depth_rooflines or (None,) * len(r.depth_speeds),
                                                 strict=True))
        noisy = [s.noise.reason for s in (speed, *r.depth_speeds) if s is not None and s.noisy and s.noise]
        if noisy:
            throughput += f" - noisy: {noisy[0].removeprefix('Noisy: ')}"
        q = r.quality
        if q is not None:
            kld = kld_name(q.reference.top_k if q.reference else DEFAULT_TOP_K)
            ppl = f"PPL {_known_pm(q.ppl, q.ppl_se, '{:.2f}')} (ref {_known(q.ppl_ref, '{:.2f}')})"
            if r.is_quality_reference:
                qtext = f"reference ({kld} 0 and top-1 100 % by definition), {ppl}"
            else:
                qtext = (f"{kld} {_known_pm(q.kld_mean, q.kld_se, '{:.4f}')}, "
                         f"top-1 {_known_pm(q.same_top1_pct, q.same_top1_se_pct, '{:.1f}', ' %')}, {ppl}")
        else:
            qtext = "not measured"
        if r.tasks:
            qtext += "; " + "; ".join(task_text(t) for t in r.tasks)
        if not compared:
            label += f" (other settings, not compared: {r.settings_text()})"
        lines.append(f"| {label} | {memory} | {throughput} | {qtext} |")
    if grouped and grouped[0][1]:
        lines.append("")
        lines.append(f"Compared rows: {grouped[0][0].record.settings_text()}; mean ± sd over each row's own "
                     "repetitions (adaptive, up to the configured count); engine per row; quality figures "
                     "mean ± standard error.")
    accuracy = _task_accuracy(results)
    if accuracy:
        lines += ["", "Task accuracy (95 % Wilson interval; recovery = accuracy ÷ the reference's; exact McNemar "
                  "on the same items):", ""]
        for row in accuracy:
            test = row.versus_reference
            lines.append(f"- {task_title(row.task)}, {_label(row.precision)}: {row.passed}/{row.n} = "
                         f"{100 * (row.accuracy or 0.0):.1f} % [{100 * row.low:.1f}, {100 * row.high:.1f}]"
                         + (f", recovery {row.recovery:.2f}" if row.recovery is not None else "")
                         + (f"; against {_label(test.against)}: {test.verdict}" if test else ""))
        lines += [""] + [v.text for v in verdicts(accuracy)]
    loads = [(result.record, good) for result, _compared in grouped if result.record.server is not None
             and result.record.server.load_plan is not None for good in result.record.server.goodput]
    if loads:
        lines += ["", "Capacity under load (goodput: the highest concurrency within the objective, and its output "
                  "tok/s over all streams):", ""]
        lines += [f"- {record.precision_label}: {good.sentence}" for record, good in loads]
    return "\n".join(lines) + "\n"


def _label(precision: str) -> str:
    return BY_KEY[precision].label if precision in BY_KEY else precision


def _known(value: float | None, fmt: str) -> str:
    return fmt.format(value) if known(value) is not None else "n/a"


def _known_pm(value: float | None, se: float | None, fmt: str, unit: str = "") -> str:
    """A mean ± its standard error; the mean alone where an older row has no SE."""
    if known(value) is None:
        return "n/a"
    return fmt.format(value) + unit + (f" ± {fmt.format(se)} SE" if known(se) is not None else "")


def _reference_role(record: RunRecord) -> str | None:
    """"reference" for the reference precision's own row (its KLD and top-1 are by definition), "measured"
    for a row measured against it; None without quality."""
    if record.quality is None:
        return None
    return "reference" if record.is_quality_reference else "measured"


def write_exports(results: list[StoredResult], folder: Path) -> list[Path]:
    """results.csv, results.json and results.md in ``folder`` (each written whole, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    written = []
    for name, render in (("results.csv", to_csv), ("results.json", to_json), ("results.md", to_markdown)):
        path = folder / name
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(render(results), encoding="utf-8")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        written.append(path)
    return written
