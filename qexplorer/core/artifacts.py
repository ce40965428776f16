"""Where a model's artifacts and references live, and how jobs share them.

Everything qexplorer makes for a model (the dequantized BF16 checkpoint, each
precision's GGUF or compressed-tensors folder, the reference log-probs) sits
under one folder per model *file*, so the CLI (``default``), the app (a path)
and a later session find the same artifacts whatever the model was called.
Builders take :func:`file_lock` around a build, so two processes never write
one ``.partial`` folder at once; the second finds the finished result.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qexplorer.core.model import ModelSpec


def model_key(spec: ModelSpec) -> str:
    """A folder name for a model's artifacts, from the files alone: readable, and unique per file version. A
    folder is keyed by each of its files' name, size and modification time (weights overwritten in place change
    neither the folder's size nor its mtime)."""
    path = Path(spec.path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stamps = [f"{p.name}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in files]
    digest = hashlib.sha256("\n".join([str(path), *stamps]).encode()).hexdigest()[:10]
    stem = path.stem if path.is_file() else path.name
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in stem)[:60]
    return f"{safe}-{digest}"


def model_work_dir(data_dir: Path, spec: ModelSpec) -> Path:
    folder = data_dir / "artifacts" / model_key(spec)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held for the block (released by the kernel if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def content_sha256(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (relative names and contents, in name order)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _stamp(path: Path) -> str:
    """What a change to a file or folder changes: each file's relative name, size and modification time."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    parts = [f"{p.relative_to(path) if path.is_dir() else p.name}|{p.stat().st_size}|{p.stat().st_mtime_ns}"
             for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _sidecar(path: Path, work_dir: Path | None) -> Path:
    resolved = path.resolve()
    if work_dir is None or resolved.is_relative_to(work_dir.resolve()):
        return path.with_name(path.name + ".sha256.json")
    tag = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    return work_dir / f"source-{path.name}-{tag}.sha256.json"


def _kept(sidecar: Path, stamp: str) -> str | None:
    import json

    try:
        kept = json.loads(sidecar.read_text(encoding="utf-8"))
        if kept.get("stamp") == stamp and isinstance(kept.get("sha256"), str):
            return str(kept["sha256"])
    except (OSError, ValueError, AttributeError):
        pass  # none yet, or unreadable: hash it
    return None


def already_hashed(path: Path, work_dir: Path | None = None) -> bool:
    """Whether :func:`artifact_sha256` would read the hash back instead of hashing (the ETA's question)."""
    return path.exists() and _kept(_sidecar(path, work_dir), _stamp(path)) is not None


def artifact_sha256(path: Path, work_dir: Path | None = None) -> str:
    """:func:`content_sha256` of an artifact, hashed once: kept beside it (``NAME.sha256.json``) keyed by its
    files' names, sizes and modification times, and read back while they are unchanged - hashing a 60 GB folder
    on every job costs minutes. A folder outside ``work_dir`` (the user's own BF16 checkpoint) keeps its
    sidecar in ``work_dir`` instead: nothing is written beside the user's files."""
    import json

    sidecar = _sidecar(path, work_dir)
    stamp = _stamp(path)
    kept = _kept(sidecar, stamp)
    if kept is not None:
        return kept
    digest = content_sha256(path)
    try:
        partial = sidecar.with_name(sidecar.name + f".{os.getpid()}.partial")
        partial.write_text(json.dumps({"stamp": stamp, "sha256": digest}), encoding="utf-8")
        os.replace(partial, sidecar)
    except OSError:
        pass  # a read-only place: hashed again next time
    return digest
