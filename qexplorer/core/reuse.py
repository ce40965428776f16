"""A measurement shown again when nothing it depends on has changed.

A job's figures depend on: the artifact's bytes (its SHA-256), the engine and
every library version, the machine (CPU, cores, GPU), the benchmark settings
(pp, tg, repetitions, threads, depths), the quality settings (corpus,
tokens, context, top-k, reference precision, or no quality at all), the task pass (which tasks, how many
items) and the load sweep (levels, lengths, objective). Their
digest is the record's :attr:`~qexplorer.core.domain.record.RunRecord.reuse_key`.
A later job with the same key would redo the same measurement, so the worker
asks the parent (which alone opens the results store) and returns the stored
one instead, marked ``reused_from`` with the date it was
measured - unless the user asked to re-measure (``--remeasure``; ``M`` on the
plan screen), or the stored speed was timed while other processes were busy or
beside other work, which are measured again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from qexplorer.core.domain.phases import TIMED
from qexplorer.core.domain.record import RunRecord
from qexplorer.core.domain.spec import JobSpec
from qexplorer.core.kinds import JobStatus
from qexplorer.core.serial import to_jsonable

if TYPE_CHECKING:  # the parent passes its store in; the worker, which computes keys, never opens one
    from qexplorer.core.results import ResultsStore, StoredResult


def reuse_key(job: JobSpec, artifact_sha256: str, versions: dict[str, str], engine_version: str | None,
              cpu: str, gpu: str | None, corpus_sha256: str | None = None) -> str:
    """The digest of everything a job's figures depend on. The corpus by its content (an edited file is a new
    measurement), the engine by what decides which one runs and how (``engine_version``: vLLM's build and the
    choice of engine, or llama.cpp's build flags and GPU offload), the threads the engines are given."""
    quality: dict[str, Any] | None = None
    if job.quality:
        quality = {"corpus": corpus_sha256 or job.quality_corpus, "tokens": job.quality_tokens,
                   "ctx": job.quality_ctx, "top_k": job.top_k, "reference": job.reference_precision}
    facts = {"precision": job.precision, "artifact_sha256": artifact_sha256, "versions": versions,
             "engine": engine_version, "engine_args": list(job.engine_args), "bench": to_jsonable(job.bench),
             "threads": job.bench.thread_count, "quality": quality, "cpu": cpu, "cores": os.cpu_count(),
             "machine": platform.machine(), "gpu": gpu}
    if job.tasks:  # only then: the keys of results without a task pass stay what they were
        from qexplorer.core.tasks.run import TASK_CONTEXT_TOKENS

        facts["task_pass"] = {"names": list(job.tasks), "limit": job.tasks_limit, "context": TASK_CONTEXT_TOKENS}
    if job.load is not None:  # likewise: a load sweep (its levels, lengths, objective, stop rule) is a new key
        facts["load_sweep"] = to_jsonable(job.load)
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def quiet(record: RunRecord) -> bool:
    """A speed worth showing again: timed alone, with no other process busy (those are gone now, so timing it
    again would give a different figure). A wide spread on an otherwise idle machine belongs to the machine and
    would come back: such a result is shown again with its noise flag, as measured."""
    speeds = [s for s in (record.speed, *record.depth_speeds) if s is not None]
    return bool(speeds) and not record.busy_host and TIMED.isdisjoint(record.shared_phases)


def complete(record: RunRecord, wants_load: bool = False) -> bool:
    """Its task pass and, when the job asks for one, its load sweep succeeded (a sweep with no finished level is
    a failure): one that failed is measured again, not shown again."""
    return record.task_error is None and not (wants_load and (record.server is None or not record.server.levels))


def find_reusable(store: ResultsStore, record_path: str, precision: str, key: str, *,
                  wants_load: bool = False) -> StoredResult | None:
    """The newest finished result of this model and precision with the same key and a quiet speed."""
    for stored in sorted(store.all(model_path=record_path), key=lambda r: r.created_at, reverse=True):
        record = stored.record
        if (stored.status == JobStatus.OK and record.precision == precision and record.reuse_key == key
                and record.reused_from is None and quiet(record) and complete(record, wants_load)):
            return stored
    return None


def reused(stored: StoredResult) -> RunRecord:
    """The stored record, marked as shown again."""
    when = datetime.fromtimestamp(stored.created_at, tz=UTC).isoformat(timespec="seconds")
    return replace(stored.record, reused_from=stored.id, reused_measured_at=when)
