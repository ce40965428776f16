"""Shared fixtures. Snapshot SVGs live in top-level snapshots/<test module>/."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_textual_snapshot
from syrupy.location import PyTestLocation

ROOT = Path(__file__).resolve().parents[1]


class TopLevelSnapshots(pytest_textual_snapshot.SVGImageExtension):
    @classmethod
    def dirname(cls, *, test_location: PyTestLocation) -> str:
        return str(ROOT / "snapshots" / Path(test_location.filepath).stem)


pytest_textual_snapshot.SVGImageExtension = TopLevelSnapshots


@pytest.fixture(autouse=True)
def isolated_user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never read or write the real user's config, data or model caches."""
    monkeypatch.setenv("QEXPLORER_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("QEXPLORER_DATA_DIR", str(tmp_path / "data"))
    # model discovery sees only what a test puts there
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    monkeypatch.setenv("QEXPLORER_LMSTUDIO_DIR", str(tmp_path / "lmstudio"))
    # estimates stay the defaults' on every machine (snapshots show them); test_eta calibrates on purpose
    monkeypatch.setenv("QEXPLORER_NO_CALIBRATION", "1")
    for var in ("QEXPLORER_CONFIG", "QEXPLORER_REFRESH_S", "QEXPLORER_RESERVE_GIB", "QEXPLORER_THEME",
                "QEXPLORER_CONTEXT", "QEXPLORER_RESULTS_DIR", "NO_COLOR"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path
