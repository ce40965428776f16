"""Themes from ``themes/*.toml`` (shipped) and the user's theme folder.

A bad file never stops the app: it is skipped and reported in one sentence, and
the default theme stands in.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from textual.color import Color, ColorParseError
from textual.theme import Theme

from qexplorer.core.settings import config_dir


def _shipped_themes_dir() -> Path:
    """``themes/`` of the source tree, or the installed ``qexplorer.themes`` package of a wheel."""
    source_tree = Path(__file__).resolve().parents[2] / "themes"
    if source_tree.is_dir():
        return source_tree
    from importlib.resources import files

    return Path(str(files("qexplorer.themes")))


SHIPPED_THEMES_DIR = _shipped_themes_dir()
DEFAULT_THEME = "qexplorer-dark"
COLOUR_KEYS = ("primary", "secondary", "accent", "warning", "error", "success",
               "foreground", "background", "surface", "panel")


def user_themes_dir() -> Path:
    return config_dir() / "themes"


@dataclass(frozen=True)
class ThemeLoad:
    themes: tuple[Theme, ...]
    problems: tuple[str, ...]


def theme_from_file(path: Path) -> Theme:
    """Parse one theme file; raises ValueError with a sentence for a person."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"Theme file {path.name} could not be read ({exc}).") from None
    name = document.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"Theme file {path.name} has no `name`.")
    if "primary" not in document:
        raise ValueError(f"Theme file {path.name} has no `primary` colour.")
    colours = {}
    for key in COLOUR_KEYS:
        if key in document:
            try:
                Color.parse(str(document[key]))
            except ColorParseError:
                raise ValueError(f"Theme file {path.name}: {key} = {document[key]!r} is not a colour.") from None
            colours[key] = str(document[key])
    return Theme(name=name, dark=bool(document.get("dark", True)), **colours)


def load_themes(*folders: Path) -> ThemeLoad:
    themes: list[Theme] = []
    problems: list[str] = []
    for folder in folders or (SHIPPED_THEMES_DIR, user_themes_dir()):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.toml")):
            try:
                themes.append(theme_from_file(path))
            except ValueError as exc:
                problems.append(str(exc))
    return ThemeLoad(tuple(themes), tuple(problems))
