"""Settings precedence and validation; theme files and their fallback."""

from __future__ import annotations

from pathlib import Path

import pytest
from apps import sim_app

from qexplorer.core.errors import UserError
from qexplorer.core.settings import load_settings, save_setting
from qexplorer.ui.themes import SHIPPED_THEMES_DIR, load_themes, theme_from_file


def test_defaults_file_env_precedence(tmp_path: Path):
    config = tmp_path / "config.toml"
    assert load_settings(config, {}).refresh_s == 1.0
    config.write_text("refresh_s = 2.0\nreserve_gib = 4\n")
    settings = load_settings(config, {"QEXPLORER_RESERVE_GIB": "6"})
    assert settings.refresh_s == 2.0 and settings.reserve_gib == 6.0
    assert settings.reserve_bytes == 6 * 1024**3
    assert settings.with_overrides("flags", refresh_s=0.5).refresh_s == 0.5


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("refresh_s = 0.1\n", {}, "refresh_s in"),
        ("refresh_s = [\n", {}, "could not be read"),
        ("colour = 'red'\n", {}, "unknown keys colour"),
        ("", {"QEXPLORER_REFRESH_S": "fast"}, "not a valid float"),
    ],
)
def test_bad_settings_are_one_sentence(tmp_path: Path, text, env, message):
    config = tmp_path / "config.toml"
    config.write_text(text)
    with pytest.raises(UserError, match=message):
        load_settings(config, env)


def test_save_setting_is_user_only(tmp_path: Path):
    path = save_setting("theme", "qexplorer-light", tmp_path / "cfg" / "config.toml")
    assert (path.stat().st_mode & 0o777) == 0o600
    assert load_settings(path, {}).theme == "qexplorer-light"


def test_shipped_themes_load():
    loaded = load_themes(SHIPPED_THEMES_DIR)
    assert {t.name for t in loaded.themes} >= {"qexplorer-dark", "qexplorer-light", "qexplorer-contrast"}
    assert loaded.problems == ()


def test_bad_theme_file_is_reported_and_skipped(tmp_path: Path):
    (tmp_path / "broken.toml").write_text("name = \n")
    (tmp_path / "badcolour.toml").write_text('name = "x"\nprimary = "not-a-colour"\n')
    loaded = load_themes(tmp_path)
    assert loaded.themes == ()
    assert any("could not be read" in p for p in loaded.problems)
    assert any("is not a colour" in p for p in loaded.problems)
    with pytest.raises(ValueError, match="no `name`"):
        (tmp_path / "noname.toml").write_text('primary = "#ffffff"\n')
        theme_from_file(tmp_path / "noname.toml")


async def test_app_falls_back_from_unknown_theme_with_a_message(isolated_user_dirs):
    themes = isolated_user_dirs / "config" / "themes"
    themes.mkdir(parents=True)
    (themes / "mine.toml").write_text("name = [\n")
    app = sim_app("none", theme="does-not-exist")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        assert app.theme == "qexplorer-dark"
        messages = [n.message for n in app._notifications]
        assert any("mine.toml" in m for m in messages)
        assert any("'does-not-exist' is not installed" in m for m in messages)


async def test_no_color_uses_ansi_theme(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    app = sim_app("none")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        assert app.theme == "ansi-dark"


async def test_theme_switch_persists(isolated_user_dirs):
    from qexplorer.core.settings import load_settings

    app = sim_app("none")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        app.theme = "qexplorer-contrast"
        await pilot.pause()
    assert load_settings().theme == "qexplorer-contrast"


def test_tokenizer_mismatch_after_conversion_is_one_sentence(tmp_path: Path):
    import json

    import numpy as np
    from gguf import GGUFWriter

    from qexplorer.core.quantize.gguf_quant import tokenizer_mismatch

    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    writer = GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_tensor("output_norm.weight", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "cannot tokenize" in tokenizer_mismatch(tmp_path, tmp_path / "x.gguf")
