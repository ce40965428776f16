"""A bounded reader for the header of a GGUF file: metadata and tensor shapes.

Written by hand on purpose: ``gguf.GGUFReader`` builds a numpy object for every
tokenizer string (2.3 s for the bundled 94 MB model) and maps every tensor,
while the catalog needs only the header, for many files, fast, and must turn
any damaged file into one clean error (it is fuzzed). The type tables
(quantization block sizes, file-type names) come from the ``gguf`` package.

Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qexplorer.core.errors import ModelReadError

MAGIC = b"GGUF"
MAX_TENSORS = 1_000_000
MAX_KV = 100_000
MAX_DIMS = 4
MAX_STRING_BYTES = 64 * 1024 * 1024
KEEP_ARRAY_ITEMS = 64  # longer arrays (tokenizer tables) keep only their length

_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GgufArray:
    """An array value: its item type, length and (for short arrays) its items."""

    item_type: int
    length: int
    items: tuple[Any, ...] | None


@dataclass(frozen=True)
class GgufTensor:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the row length (input features)
    type_id: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def n_bytes(self) -> int:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(self.type_id)]
        except (ValueError, KeyError):
            return 0
        return self.n_elements // block * type_size

    @property
    def type_name(self) -> str:
        from gguf.constants import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.type_id).name
        except ValueError:
            return f"type{self.type_id}"


@dataclass(frozen=True)
class GgufHeader:
    version: int
    metadata: dict[str, Any]
    tensors: tuple[GgufTensor, ...]
    file_size: int


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> ModelReadError:
        return ModelReadError(
            f"{self.path.name} is not a readable GGUF file ({what} at byte {self.pos}); "
            "it may be truncated or corrupt - download or convert it again."
        )

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise self.fail("unexpected end of file")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, limit: int = MAX_STRING_BYTES) -> str:
        length = self.take("<Q")
        if length > limit or self.pos + length > len(self.buf):
            raise self.fail(f"string of {length} bytes")
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        length = self.take("<Q")
        if self.pos + length > len(self.buf):
            raise self.fail(f"string of {length} bytes")
        self.pos += length

    def value(self, type_id: int, depth: int = 0) -> Any:
        if type_id in _SCALARS:
            return self.take(_SCALARS[type_id])
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            if depth > 2:
                raise self.fail("arrays nested too deep")
            item_type = self.take("<I")
            length = self.take("<Q")
            remaining = len(self.buf) - self.pos
            if length > remaining:  # every item takes at least one byte
                raise self.fail(f"array of {length} items")
            keep = length <= KEEP_ARRAY_ITEMS
            if item_type in _SCALARS:
                size = struct.calcsize(_SCALARS[item_type])
                if self.pos + size * length > len(self.buf):
                    raise self.fail(f"array of {length} items")
                if keep:
                    items = tuple(self.value(item_type) for _ in range(length))
                else:
                    self.pos += size * length
                    items = None
            elif item_type == _STRING and not keep:
                for _ in range(length):
                    self.skip_string()
                items = None
            elif item_type in (_STRING, _ARRAY):
                items = tuple(self.value(item_type, depth + 1) for _ in range(length))
                if not keep:
                    items = None
            else:
                raise self.fail(f"unknown array item type {item_type}")
            return GgufArray(item_type, length, items)
        raise self.fail(f"unknown value type {type_id}")


def read_gguf_header(path: Path) -> GgufHeader:
    """Parse the header of ``path``; any damage becomes a :class:`ModelReadError`."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            if size < 24:
                raise ModelReadError(f"{path.name} is too small to be a GGUF file ({size} bytes).")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, path, size)
    except PermissionError:
        raise ModelReadError(f"{path} cannot be read: permission denied.") from None
    except IsADirectoryError:
        raise ModelReadError(f"{path} is a folder, not a GGUF file.") from None
    except FileNotFoundError:
        raise ModelReadError(f"{path} does not exist.") from None
    except OSError as exc:
        raise ModelReadError(f"{path} cannot be read ({exc.strerror or exc}).") from None


def _parse(buf: mmap.mmap | bytes, path: Path, size: int) -> GgufHeader:
    if bytes(buf[:4]) != MAGIC:
        raise ModelReadError(f"{path.name} is not a GGUF file (it does not start with 'GGUF').")
    cursor = _Cursor(buf, path)
    cursor.pos = 4
    version = cursor.take("<I")
    if version not in (2, 3):
        raise cursor.fail(f"unsupported GGUF version {version}")
    tensor_count = cursor.take("<Q")
    kv_count = cursor.take("<Q")
    if tensor_count > MAX_TENSORS or kv_count > MAX_KV:
        raise cursor.fail(f"implausible counts ({tensor_count} tensors, {kv_count} keys)")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string(limit=65_536)
        metadata[key] = cursor.value(cursor.take("<I"))
    tensors = []
    for _ in range(tensor_count):
        name = cursor.string(limit=65_536)
        n_dims = cursor.take("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cursor.fail(f"tensor {name!r} with {n_dims} dimensions")
        dims = tuple(cursor.take("<Q") for _ in range(n_dims))
        type_id = cursor.take("<I")
        cursor.take("<Q")  # data offset
        tensors.append(GgufTensor(name, dims, type_id))
    header = GgufHeader(version, metadata, tuple(tensors), size)
    data_bytes = sum(t.n_bytes for t in tensors)
    if data_bytes > size - cursor.pos:
        raise ModelReadError(
            f"{path.name} is truncated: its tensors need {data_bytes:,} bytes but only "
            f"{size - cursor.pos:,} follow the header; download or convert it again."
        )
    return header


def file_type_name(file_type: int | None) -> str | None:
    """``general.file_type`` 3 -> ``"Q4_1"``."""
    if file_type is None:
        return None
    from gguf.constants import LlamaFileType

    try:
        name = LlamaFileType(file_type).name
    except ValueError:
        return f"file type {file_type}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")
