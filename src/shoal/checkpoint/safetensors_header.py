"""Validate a ``.safetensors`` header before any byte of tensor data is trusted.

Layout of the format (https://github.com/huggingface/safetensors):

    [8 bytes: N, little-endian u64][N bytes: JSON header][data section]

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
with offsets relative to the start of the data section, plus an optional
``"__metadata__"`` map of strings. A well-formed file has tensors that tile the data
section exactly: sorted by ``begin`` the first starts at 0, each starts where the previous
ends, the last ends at the end of the file, and each spans ``prod(shape) * itemsize`` bytes.
Everything here reads only the first ``8 + N`` bytes of the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.checkpoint.dtypes import BY_NAME, BY_TAG, torch_dtype
from shoal.checkpoint.file_guard import file_identity
from shoal.errors import CheckpointError

if TYPE_CHECKING:
    import torch

# The safetensors reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it (offsets relative to the data section)."""

    name: str
    dtype_name: str  # torch's name of the dtype (shoal.checkpoint.dtypes)
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def itemsize(self) -> int:
        return BY_NAME[self.dtype_name].itemsize

    @property
    def dtype(self) -> "torch.dtype":
        """The ``torch.dtype`` (imports torch)."""
        return torch_dtype(self.dtype_name)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors in data-section order, the metadata, and where data starts."""

    path: Path
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str]
    data_start: int
    identity: tuple[int, int, int, int] = (0, 0, 0, 0)  # the file read: see file_identity

    def by_name(self) -> dict[str, TensorEntry]:
        return {entry.name: entry for entry in self.tensors}


def _fail(path: Path, message: str) -> CheckpointError:
    return CheckpointError(f"{path}: {message}")


def _reject_duplicate_keys(path: Path):
    def build(pairs: list[tuple[str, object]]) -> dict:
        result: dict = {}
        for key, value in pairs:
            if key in result:
                raise _fail(path, f"corrupt safetensors header: key {key!r} appears twice")
            result[key] = value
        return result

    return build


def _parse_entry(path: Path, name: str, raw: object) -> TensorEntry:
    where = f"tensor {name!r}"
    if not isinstance(raw, dict):
        raise _fail(path, f"corrupt safetensors header: {where} is not an object")
    tag, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if tag not in BY_TAG:
        raise _fail(path, f"{where} has an unsupported or unknown dtype {tag!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _fail(path, f"corrupt safetensors header: {where} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _fail(path, f"corrupt safetensors header: {where} has invalid data_offsets {offsets!r}")
    info = BY_TAG[tag]
    itemsize = info.itemsize
    expected = math.prod(shape) * itemsize
    if offsets[1] - offsets[0] != expected:
        raise _fail(
            path,
            f"corrupt safetensors header: {where} ({tag}, shape {shape}) needs {expected} bytes "
            f"but its data_offsets {offsets} span {offsets[1] - offsets[0]}",
        )
    return TensorEntry(name=name, dtype_name=info.name, shape=tuple(shape), begin=offsets[0], end=offsets[1])


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``.

    Raises :class:`CheckpointError` naming the file (and the tensor, when one is at fault)
    for a truncated file, a header that is not JSON, an unknown dtype, a size that does not
    match the shape, or offsets that overlap, leave gaps or run past the end of the file.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            stat = os.fstat(handle.fileno())
            file_size = stat.st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"truncated safetensors file ({file_size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise _fail(path, f"corrupt safetensors file: header length {header_len} is implausible")
            if 8 + header_len > file_size:
                raise _fail(
                    path,
                    f"truncated or corrupt safetensors file: header says {header_len} bytes "
                    f"but the file has {file_size - 8} after the length prefix",
                )
            header_bytes = handle.read(header_len)
    except OSError as exc:
        raise _fail(path, f"cannot read file: {exc.strerror or exc}") from exc

    try:
        header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, "corrupt safetensors header: not valid UTF-8 JSON") from exc
    except RecursionError:  # a header is one level of objects; this one nests thousands deep
        raise _fail(path, "corrupt safetensors header: JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise _fail(path, "corrupt safetensors header: not a JSON object")

    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "corrupt safetensors header: __metadata__ must map strings to strings")

    entries = sorted(
        (_parse_entry(path, name, raw) for name, raw in header.items()),
        key=lambda e: (e.begin, e.end),
    )
    data_start = 8 + header_len
    data_len = file_size - data_start
    position = 0
    for entry in entries:
        if entry.begin != position:
            problem = "overlaps the previous tensor" if entry.begin < position else "leaves a gap before it"
            raise _fail(
                path,
                f"corrupt safetensors header: tensor {entry.name!r} data_offsets "
                f"[{entry.begin}, {entry.end}] {problem} (expected to start at {position})",
            )
        position = entry.end
    if position != data_len:
        if position > data_len:
            culprit = entries[-1].name
            raise _fail(
                path,
                f"truncated or corrupt safetensors file: tensor {culprit!r} ends at byte {position} "
                f"of the data section but it holds only {data_len} bytes",
            )
        raise _fail(
            path,
            f"corrupt safetensors file: {data_len - position} bytes after the last tensor "
            f"(data section {data_len} bytes, tensors cover {position})",
        )
    return SafetensorsHeader(path=path, tensors=tuple(entries), metadata=metadata, data_start=data_start,
                             identity=file_identity(stat))
