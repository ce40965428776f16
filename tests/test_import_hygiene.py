"""Core never imports Textual; the UI process has not imported torch at first frame."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap

import qexplorer.core


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, check=True).stdout


def test_core_is_headless():
    modules = sorted(m.name for m in pkgutil.walk_packages(qexplorer.core.__path__, "qexplorer.core."))
    assert "qexplorer.core.telemetry" in modules
    out = run_python(f"""
        import importlib, sys
        for name in {modules!r}:
            importlib.import_module(name)
        bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'torch', 'transformers'))
        print(bad)
    """)
    assert out.strip() == "[]"


def test_ui_has_no_torch_at_first_frame():
    out = run_python("""
        import asyncio, sys
        from qexplorer.core.settings import Settings
        from qexplorer.ui.app import make_app
        from qexplorer.ui.sources import Sources

        async def main():
            settings = Settings()
            app = make_app(settings, Sources.for_profile("gb10", settings))
            async with app.run_test(size=(80, 24)) as pilot:
                await pilot.pause()
                await app.workers.wait_for_complete()
        asyncio.run(main())
        print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'llama_cpp')))
    """)
    assert out.strip().splitlines()[-1] == "[]"


def test_core_has_no_command_line_code():
    """Commands live in qexplorer/cli: core neither parses arguments nor writes to the terminal."""
    import re
    from pathlib import Path

    offenders = []
    for path in sorted(Path(qexplorer.core.__file__).parent.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for pattern in (r"^\s*(import|from) argparse", r"\bprint\(", r"sys\.(stdout|stderr)\.write"):
            if re.search(pattern, text, re.M):
                offenders.append(f"{path.name}: {pattern}")
    assert offenders == []


def test_listed_packages_match_the_tree():
    """pyproject lists its packages (themes/ is mapped in): a new package folder must be added there."""
    import tomllib
    from pathlib import Path

    root = Path(qexplorer.core.__file__).parents[2]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(root).parts) for p in (root / "qexplorer").rglob("__init__.py")}
    assert on_disk | {"qexplorer.themes", "qexplorer.data"} == listed
