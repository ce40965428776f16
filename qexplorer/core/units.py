"""Units: one place that turns byte counts and rates into text a person reads.

Binary units (GiB) throughout, because that is what `free -h`, nvitop and the
kernel's own numbers use; the planner's "GB" ladder in the README says so too.
"""

from __future__ import annotations

KIB = 1024
MIB = 1024**2
GIB = 1024**3


def format_bytes(n_bytes: int | float | None, *, precision: int = 1) -> str:
    """`34359738368` -> `"32.0 GiB"`; `None` -> `"n/a"`."""
    if n_bytes is None:
        return "n/a"
    value = float(n_bytes)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if value >= size:
            return f"{sign}{value / size:.{precision}f} {unit}"
    return f"{sign}{value:.0f} B"


def format_gib(n_bytes: int | float | None, *, precision: int = 1) -> str:
    """Always in GiB, so columns of figures line up."""
    if n_bytes is None:
        return "n/a"
    return f"{n_bytes / GIB:.{precision}f} GiB"


def format_count(n: int | float | None) -> str:
    """Parameter counts: `134515008` -> `"134.5 M"`."""
    if n is None:
        return "n/a"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f}"
