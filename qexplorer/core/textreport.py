"""Plain-text renderings of core data for the terminal (no Textual, no Rich)."""

from __future__ import annotations

from qexplorer.core.telemetry import Reading, TelemetrySnapshot
from qexplorer.core.units import format_bytes, format_gib


def reading_text(reading: Reading, unit: str = "bytes") -> str:
    """A reading with its unit, or why it is missing."""
    if reading.value is None:
        return f"unavailable ({reading.note})" if reading.note else "unavailable"
    if unit == "bytes":
        return format_gib(reading.value, precision=2)
    if unit == "%":
        return f"{reading.value:.0f} %"
    return f"{reading.value:g} {unit}"


def snapshot_text(snapshot: TelemetrySnapshot) -> str:
    host = snapshot.host
    lines = []
    if snapshot.simulated:
        lines.append(f"SIMULATED hardware profile: {snapshot.simulated}")
    lines.append("Host memory")
    lines.append(f"  total        {reading_text(host.total_bytes)}")
    lines.append(f"  available    {reading_text(host.available_bytes)}")
    lines.append(f"  used         {reading_text(host.used_bytes)}  (MemTotal − MemAvailable)")
    lines.append(f"  page cache   {reading_text(host.reclaimable_cache_bytes)}  (reclaimable)")
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
