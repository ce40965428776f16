"""Plot helpers: series colours taken from the current theme, so plots follow it."""

from __future__ import annotations

from textual.app import App
from textual.color import Color


def theme_rgb(app: App, variable: str) -> tuple[int, int, int]:
    """A theme variable (``accent``, ``success``…) as the RGB tuple plotext accepts."""
    value = app.theme_variables.get(variable) or app.theme_variables.get("foreground", "#ffffff")
    color = Color.parse(value)
    return (color.r, color.g, color.b)
