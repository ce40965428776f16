"""Redraw only what is on screen: the rule every screen that follows the app's reactives keeps.

A screen under another one (the dashboard under the jobs screen, the plan screen under compare) used to redraw
on every sample: plots and tables nobody saw, on the event loop, on the CPU a benchmark was timing. A screen
redraws while it is the one shown and once more when it is shown again. While a job is timed (the app's
``quiet``: a phase that runs alone, core.domain.phases) the screens also leave their plots as they are and draw
them again when the figure is taken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from textual.screen import Screen


def watch_while_shown(screen: Screen, names: Iterable[str], redraw: Callable[[], None]) -> None:
    """Call ``redraw`` when any of the app's reactives ``names`` changes, if ``screen`` is the one shown."""
    for name in names:
        screen.watch(screen.app, name, lambda _: redraw() if screen.is_current else None, init=False)
