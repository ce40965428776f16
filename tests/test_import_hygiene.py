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
