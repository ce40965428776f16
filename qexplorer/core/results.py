"""The results store: SQLite in the user's data dir, one row per job.

Identity columns (model, precision, backend, status, time) are real columns;
every measured figure lives in the ``record`` JSON so that new metrics need no
migration. ``schema_version`` in ``PRAGMA user_version`` - bump it and add a
step to ``MIGRATIONS`` when the table changes.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qexplorer.core.errors import UserError
from qexplorer.core.units import format_bytes

SCHEMA_VERSION = 1
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
}


@dataclass(frozen=True)
class StoredResult:
    id: int
    created_at: float
    model_name: str
    model_path: str
    precision: str
    family: str
    backend: str | None
    status: str  # "ok", "failed", "cancelled", "stopped", "timeout"
    error: str | None
    record: dict[str, Any]

    def metric(self, *path: str) -> Any:
        value: Any = self.record
        for key in path:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value


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
                conn.executescript(MIGRATIONS[step])
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

    def add(self, record: dict[str, Any], status: str = "ok", error: str | None = None) -> int:
        conn = self._connect()
        try:
            with conn:
                cursor = conn.execute(
                    "INSERT INTO results (created_at, model_name, model_path, precision, family, backend, status,"
                    " error, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (time.time(), record.get("model_name", "?"), record.get("model_path", "?"),
                     record.get("precision", "?"), record.get("family", "?"), record.get("backend"),
                     status, error, json.dumps(record, default=str)),
                )
                return int(cursor.lastrowid or 0)
        finally:
            conn.close()

    def all(self, model_path: str | None = None, include_failed: bool = False) -> list[StoredResult]:
        conn = self._connect()
        try:
            query = "SELECT id, created_at, model_name, model_path, precision, family, backend, status, error, record" \
                    " FROM results"
            clauses, args = [], []
            if model_path:
                clauses.append("model_path = ?")
                args.append(model_path)
            if not include_failed:
                clauses.append("status = 'ok'")
            if clauses:
                query += " WHERE " + " AND ".join(clauses)
            rows = conn.execute(query + " ORDER BY id", args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise UserError(f"The results store {self.path} is damaged ({exc}); move it aside to start "
                            "a fresh one.") from None
        finally:
            conn.close()
        results = []
        for row in rows:
            try:
                record = json.loads(row[9])
            except json.JSONDecodeError:
                continue  # one damaged row does not hide the others
            results.append(StoredResult(*row[:9], record=record))
        return results

    def latest_per_precision(self, model_path: str | None = None) -> list[StoredResult]:
        latest: dict[tuple[str, str], StoredResult] = {}
        for result in self.all(model_path):
            latest[(result.model_path, result.precision)] = result
        return sorted(latest.values(), key=lambda r: (r.model_name, r.family, r.precision))

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


# --------------------------------------------------------------------- exports
def flat_row(result: StoredResult) -> dict[str, Any]:
    """One flat dict per result; names follow llama-bench's CSV where one exists."""
    r = result.record
    hw = r.get("hardware", {}) or {}
    pp, tg, ttft = r.get("prefill_tok_s") or {}, r.get("decode_tok_s") or {}, r.get("ttft_s") or {}
    quality = r.get("quality") or {}
    return {
        "id": result.id, "model_name": result.model_name, "model_filename": result.model_path,
        "model_n_params": r.get("model_params"), "precision": result.precision, "family": result.family,
        "backend": result.backend, "mode": r.get("mode"), "status": result.status,
        "cpu_info": hw.get("cpu"), "gpu_info": hw.get("gpu"), "n_threads": r.get("threads"),
        "n_prompt": r.get("prompt_tokens"), "n_gen": r.get("gen_tokens"), "repetitions": r.get("repetitions"),
        "pp_avg_ts": pp.get("mean"), "pp_stddev_ts": pp.get("sd"),
        "tg_avg_ts": tg.get("mean"), "tg_stddev_ts": tg.get("sd"),
        "ttft_avg_s": ttft.get("mean"), "ttft_stddev_s": ttft.get("sd"),
        "roofline_pct": r.get("roofline_pct"), "bandwidth_bytes_s": hw.get("bandwidth_bytes_s"),
        "bandwidth_source": hw.get("bandwidth_source"),
        "model_size": r.get("weight_bytes"), "resident_weight_bytes": r.get("resident_weight_bytes"),
        "peak_rss_bytes": r.get("peak_rss_bytes"), "peak_gpu_bytes": r.get("peak_gpu_bytes"),
        "planned_peak_bytes": r.get("planned_peak_bytes"),
        "load_s": r.get("load_s"), "quantize_s": r.get("quantize_s"),
        "kld_mean": quality.get("kld_mean"), "same_top1_pct": quality.get("same_top1_pct"),
        "ppl": quality.get("ppl"), "ppl_ref": quality.get("ppl_ref"),
        "versions": json.dumps(r.get("versions", {}), sort_keys=True),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(result.created_at)),
    }


def to_csv(results: list[StoredResult]) -> str:
    rows = [flat_row(r) for r in results]
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def to_json(results: list[StoredResult]) -> str:
    return json.dumps({"schema": "qexplorer.results/1", "results": [flat_row(r) for r in results]}, indent=2)


def _pm(stat: dict[str, Any] | None, fmt: str = "{:.1f}") -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{fmt.format(stat['mean'])} ± {fmt.format(stat.get('sd', 0.0))}"


def to_markdown(results: list[StoredResult]) -> str:
    """The seed's table: Quantization | Memory | Throughput | Quality, with measured values."""
    lines = ["| Quantization | Memory | Throughput | Quality |", "|---|---|---|---|"]
    for result in results:
        r = result.record
        label = r.get("precision_label", result.precision)
        if r.get("mode") == "emulated":
            label += " (emulated)"
        memory = f"{format_bytes(r.get('weight_bytes'))} weights, {format_bytes(r.get('peak_rss_bytes'))} peak"
        roof = f", {r['roofline_pct']:.0f} % of roofline" if r.get("roofline_pct") else ""
        throughput = f"{_pm(r.get('decode_tok_s'))} tok/s decode, {_pm(r.get('prefill_tok_s'), '{:.0f}')} tok/s prefill{roof}"
        quality = r.get("quality") or {}
        if quality.get("kld_mean") is not None:
            qtext = (f"KLD {quality['kld_mean']:.4f}, top-1 {quality['same_top1_pct']:.1f} %, "
                     f"PPL {quality['ppl']:.2f} (ref {quality['ppl_ref']:.2f})")
        else:
            qtext = "not measured"
        lines.append(f"| {label} | {memory} | {throughput} | {qtext} |")
    if results:
        first = results[0].record
        hw = first.get("hardware", {})
        lines.append("")
        lines.append(f"Measured on {hw.get('gpu') or hw.get('cpu', '?')}; {first.get('backend')}, "
                     f"pp{first.get('prompt_tokens')}/tg{first.get('gen_tokens')} × {first.get('repetitions')}, "
                     "mean ± sd.")
    return "\n".join(lines) + "\n"


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
