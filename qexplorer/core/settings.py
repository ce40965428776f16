"""Settings: one TOML file in the user's config dir, then environment, then flags.

Later sources win. Every value is validated here, with a sentence that says
which source held the bad value and what would be accepted.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from qexplorer.core.errors import UserError
from qexplorer.core.units import GIB

APP_NAME = "qexplorer"
REFRESH_MIN_S = 0.25
REFRESH_MAX_S = 10.0


def config_dir() -> Path:
    from platformdirs import user_config_dir

    return Path(os.environ.get("QEXPLORER_CONFIG_DIR") or user_config_dir(APP_NAME))


def data_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(os.environ.get("QEXPLORER_DATA_DIR") or user_data_dir(APP_NAME))


@dataclass(frozen=True)
class Settings:
    refresh_s: float = 1.0
    reserve_gib: float = 8.0
    theme: str = "qexplorer-dark"
    default_context: int = 4096
    results_dir: str = ""  # empty: the user data dir
    models: tuple[str, ...] = ()  # extra model folders / GGUF files for the catalog
    vllm: str = ""  # the vLLM that serves Hugging Face precisions: its python or its `vllm` command; "": found
    # the service objective of bench-server --load (core.domain.load.ServiceObjective); flags override
    slo_ttft_p99_s: float = 2.0
    slo_itl_p99_ms: float = 100.0

    @property
    def reserve_bytes(self) -> int:
        return int(self.reserve_gib * GIB)

    @property
    def results_path(self) -> Path:
        return Path(self.results_dir) if self.results_dir else data_dir()

    def with_overrides(self, source: str, **values: Any) -> Settings:
        """A copy with the non-None ``values`` applied and validated."""
        clean = {k: v for k, v in values.items() if v is not None}
        return validate(replace(self, **clean), source)


ENV_VARS = {
    "refresh_s": "QEXPLORER_REFRESH_S",
    "reserve_gib": "QEXPLORER_RESERVE_GIB",
    "theme": "QEXPLORER_THEME",
    "default_context": "QEXPLORER_CONTEXT",
    "results_dir": "QEXPLORER_RESULTS_DIR",
    "vllm": "QEXPLORER_VLLM",
}


def validate(settings: Settings, source: str) -> Settings:
    if not REFRESH_MIN_S <= settings.refresh_s <= REFRESH_MAX_S:
        raise UserError(
            f"refresh_s in {source} is {settings.refresh_s}: "
            f"use a value from {REFRESH_MIN_S} to {REFRESH_MAX_S} seconds."
        )
    if not 0 <= settings.reserve_gib <= 1024:
        raise UserError(f"reserve_gib in {source} is {settings.reserve_gib}: use 0 to 1024 GiB.")
    if not 128 <= settings.default_context <= 10_000_000:
        raise UserError(
            f"default_context in {source} is {settings.default_context}: use 128 to 10,000,000 tokens."
        )
    if not (0 < settings.slo_ttft_p99_s <= 3600 and 0 < settings.slo_itl_p99_ms <= 60_000):
        raise UserError(f"slo_ttft_p99_s / slo_itl_p99_ms in {source} are {settings.slo_ttft_p99_s:g} s / "
                        f"{settings.slo_itl_p99_ms:g} ms: use positive limits (at most 3600 s / 60000 ms).")
    return settings


def _coerce(name: str, raw: Any, source: str) -> Any:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    try:
        if kind == "float":
            return float(raw)
        if kind == "int":
            return int(raw)
        if kind == "tuple[str, ...]":
            if isinstance(raw, str) or not all(isinstance(item, str) for item in raw):
                raise TypeError
            return tuple(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise UserError(f"{name} in {source} is {raw!r}, which is not a valid {kind}.") from None


def load_settings(config_file: Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Defaults, then the config file (if any), then ``QEXPLORER_*`` variables."""
    environ = dict(os.environ if environ is None else environ)
    path = config_file or Path(environ.get("QEXPLORER_CONFIG") or config_dir() / "config.toml")
    settings = Settings()
    if path.exists():
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise UserError(f"The settings file {path} could not be read ({exc}); fix or delete it.") from None
        known = {f.name for f in fields(Settings)}
        unknown = sorted(set(document) - known)
        if unknown:
            raise UserError(
                f"The settings file {path} has unknown keys {', '.join(unknown)}; "
                f"known keys are {', '.join(sorted(known))}."
            )
        values = {k: _coerce(k, v, str(path)) for k, v in document.items()}
        settings = validate(replace(settings, **values), str(path))
    for name, var in ENV_VARS.items():
        if var in environ and environ[var] != "":
            settings = validate(replace(settings, **{name: _coerce(name, environ[var], var)}), var)
    return settings


def save_setting(name: str, value: Any, config_file: Path | None = None) -> Path:
    """Persist one setting (e.g. the theme picked in the app) to the config file."""
    path = config_file or Path(os.environ.get("QEXPLORER_CONFIG") or config_dir() / "config.toml")
    document: dict[str, Any] = {}
    if path.exists():
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            document = {}
    document[name] = value
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lines = [f"{key} = {_toml_value(val)}" for key, val in sorted(document.items())]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def engine_env(settings: Settings) -> dict[str, str]:
    """What a job's worker must know of the settings to find its engines (it reads no settings file itself)."""
    return {"QEXPLORER_VLLM": settings.vllm} if settings.vllm else {}
