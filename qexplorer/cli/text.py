"""Plain-text renderings of core data for the terminal (no Textual, no Rich): what the CLI prints."""

from __future__ import annotations

from typing import Any

from qexplorer.core.capacity import sequences_text
from qexplorer.core.catalog import CatalogEntry
from qexplorer.core.eta import format_duration
from qexplorer.core.telemetry import Reading, TelemetrySnapshot
from qexplorer.core.units import format_bytes, format_count, format_gib


def reading_text(reading: Reading, unit: str = "bytes") -> str:
    return reading.text(unit)


def snapshot_text(snapshot: TelemetrySnapshot) -> str:
    host = snapshot.host
    lines = []
    if snapshot.simulated:
        lines.append(f"SIMULATED hardware profile: {snapshot.simulated}")
    lines.append("Host memory")
    lines.append(f"  total        {reading_text(host.total_bytes)}")
    lines.append(f"  available    {reading_text(host.available_bytes)}")
    lines.append(f"  MemFree      {reading_text(host.free_bytes)}  (free pages: on unified memory the GPU "
                 "allocates from these)")
    lines.append(f"  used         {reading_text(host.used_bytes)}  (MemTotal − MemAvailable)")
    lines.append(f"  page cache   {reading_text(host.reclaimable_cache_bytes)}  (reclaimable: Cached − Shmem + SReclaimable)")
    lines.append(f"  shmem        {reading_text(host.shmem_bytes)}  (not reclaimable)")
    lines.append(f"  mlocked      {reading_text(host.mlocked_bytes)}  (not reclaimable)")
    lines.append(f"  swap free    {reading_text(host.swap_free_bytes)} of {reading_text(host.swap_total_bytes)}")
    lines.append(f"  pressure     {reading_text(host.psi_some_avg10_pct, '%')} (PSI some, avg10)")
    lines.append(
        f"  headroom     {reading_text(snapshot.host_headroom_bytes)}  "
        f"(MemAvailable − reserve {format_bytes(snapshot.reserve_bytes)})"
    )
    if not snapshot.devices:
        lines.append(f"GPU: none ({snapshot.nvml_status})")
    for device in snapshot.devices:
        kind = {True: "unified memory", False: "discrete", None: "memory unknown"}[device.unified]
        lines.append(f"GPU {device.index}: {device.name} ({kind})")
        lines.append(f"  GPU used     {reading_text(device.gpu_used_bytes)}  [{device.gpu_used_bytes.note or device.gpu_used_bytes.source}]")
        lines.append(f"  total        {reading_text(device.memory_total_bytes)}")
        lines.append(f"  headroom     {reading_text(device.headroom_bytes)}")
        if device.unified:
            lines.append(f"  other host   {reading_text(device.other_host_bytes)}")
        lines.append(
            f"  util {reading_text(device.utilization_pct, '%')} · power {reading_text(device.power_w, 'W')}"
            f" · temp {reading_text(device.temperature_c, '°C')} · SM {reading_text(device.sm_clock_mhz, 'MHz')}"
        )
    lines.append("Processes (by memory)")
    for proc in snapshot.processes[:10]:
        own = " [qexplorer job]" if proc.own_job else ""
        lines.append(
            f"  {proc.pid:>7}  {proc.name[:24]:<24} GPU {format_bytes(proc.gpu_bytes) if proc.gpu_bytes else '-':>10}"
            f"  RSS {format_bytes(proc.rss_bytes):>10}{own}"
        )
    return "\n".join(lines) + "\n"


def models_text(entries: list[CatalogEntry]) -> str:
    lines = [f"{'MODEL':<40} {'SOURCE':<9} {'ARCH':<20} {'PARAMS':>9} {'STORED':<8} {'DISK':>10}"]
    for entry in entries:
        spec = entry.spec
        if spec is None:
            lines.append(f"{entry.ref[:40]:<40} {entry.source:<9} unreadable: {entry.error}")
            continue
        params = format_count(spec.total_params)
        if spec.is_moe:
            params += f" ({format_count(spec.active_params)} active)"
        lines.append(
            f"{entry.ref[:40]:<40} {entry.source:<9} {spec.architecture[:20]:<20} {params:>9} "
            f"{spec.stored_dtype[:8]:<8} {format_bytes(spec.size_on_disk_bytes):>10}"
        )
    return "\n".join(lines) + "\n"


def plan_text(document: dict[str, Any]) -> str:
    model, request = document["model"], document["request"]
    head = document["headroom_bytes"]
    seqs_header = f"SEQS @ {request['context']}"
    simulated = f" (SIMULATED {document['hardware']['simulated']})" if document["hardware"]["simulated"] else ""
    lines = [
        f"{model['name']}: {model['architecture']}, {format_count(model['total_params'])} parameters"
        + (f" ({format_count(model['active_params'])} active)" if model["n_experts"] else ""),
        f"context {request['context']} tokens × batch {request['batch']}, KV cache {request['kv_dtype']}; "
        f"target {document['hardware']['label']}{simulated}; headroom {format_gib(head, precision=2)} "
        f"(reserve {format_gib(document['reserve_bytes'])})",
        "",
        f"{'PRECISION':<20} {'BPW':>6} {'WEIGHTS':>11} {'KV CACHE':>11} {'OVERHEAD':>10} {'TOTAL':>11} "
        f"{'MARGIN':>11}  {seqs_header:>13}  {'EST. JOB':>11}  VERDICT       RUNS",
    ]
    for plan in document["plans"]:
        margin = format_bytes(plan["margin_bytes"]) if plan["margin_bytes"] is not None else "n/a"
        runs = plan["support"] if plan["support"] == "native" else f"{plan['support']}: {plan['support_note']}"
        estimate = plan.get("job_estimate")
        job = f"~{format_duration(estimate['seconds'])}" if estimate else "n/a"
        lines.append(
            f"{plan['label']:<20} {plan['bits_per_weight']:>6.2f} {format_bytes(plan['weight_bytes']):>11} "
            f"{format_bytes(plan['kv_cache_bytes']):>11} {format_bytes(plan['overhead_bytes']):>10} "
            f"{format_bytes(plan['total_bytes']):>11} {margin:>11}  {sequences_text((plan['capacity'] or {}).get('sequences')):>13}  "
            f"{job:>11}  {plan['verdict']:<13} {runs}"
        )
    for note in document["notes"]:
        lines.append(f"note: {note}")
    lines.append("estimated: weights from tensor shapes, KV = 2 × layers × kv_heads × head_dim × bytes × tokens;"
                 " formulas in README 'Memory plan'.")
    lines.append(f"seqs @ {request['context']}: {request['context']}-token sequences whose {request['kv_dtype']} KV cache "
                 "fits in headroom − weights − overhead, in the engine's blocks or slots (JSON: capacity).")
    sources = {p["job_estimate"]["source"] for p in document["plans"] if p.get("job_estimate")}
    if sources:
        lines.append(f"est. job: one job alone with the default benchmark, estimated {' / '.join(sorted(sources))}"
                     " (durations.json, per machine).")
    lines.extend(projection_lines(document))
    return "\n".join(lines) + "\n"


def projection_lines(document: dict[str, Any]) -> list[str]:
    """Where the job estimates are a projection: each precision's phases with their seconds, then what each
    projected figure rests on, once."""
    projected = [p for p in document["plans"] if (p.get("job_estimate") or {}).get("projected")]
    if not projected:
        return []
    lines = ["", "projection, per phase (estimated; not measured on this device):"]
    bases: dict[str, list[str]] = {}
    for plan in projected:
        phases = plan["job_estimate"]["phases"]
        lines.append(f"  {plan['label']:<18} " + ", ".join(f"{p[0]} {format_duration(p[1])}" for p in phases))
        for phase in phases:
            if len(phase) > 2 and phase[0] not in bases.setdefault(phase[2], []):
                bases[phase[2]].append(phase[0])
    lines.extend(f"  {'/'.join(names)}: {basis}" for basis, names in bases.items())
    return lines
