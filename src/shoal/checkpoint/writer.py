"""Sharded safetensors output in the Hugging Face layout, through one shard-file writer.

Every shard is a :class:`_ShardFile`: created with its final header, its tensors written to
their places with ``pwrite``. :class:`ShardWriter` (the merge's) knows every tensor's name,
dtype and shape in advance and writes them in any order and in pieces; :class:`ShardedWriter`
(MoE and LoRA outputs) learns them one by one, buffering tensors until the next would push
the shard past ``max_shard_bytes``, so memory stays near one shard. Shards are written under
temporary names; :func:`finish_shards` renames them to ``model-00001-of-00003.safetensors``
and writes ``model.safetensors.index.json`` (or leaves a single ``model.safetensors``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from shoal.checkpoint.dtypes import name_of
from shoal.checkpoint.dtypes import info as dtype_info
from shoal.checkpoint.lazy_torch import torch
from shoal.errors import CheckpointError

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
SAFETENSORS_METADATA = {"format": "pt"}


_SIZE_UNITS = {
    "": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    # mergekit's --out-shard-size suffixes: thousands, millions, billions (of bytes: its writer
    # compares them with numel * element_size, although its help says "parameters")
    "k": 10**3, "m": 10**6, "b": 10**9,
}


def parse_byte_size(value: int | str) -> int:
    """Bytes from ``"500MB"``, ``"5GB"`` (powers of 1000, as transformers counts), ``"2GiB"`` or ``1000``.

    A lone ``K``, ``M`` or ``B`` is mergekit's: ``"5B"`` is five billion bytes, as
    ``--out-shard-size 5B`` means in mergekit, not five bytes.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        if match is None or match.group(2).lower() not in _SIZE_UNITS:
            raise CheckpointError(f"shard size {value!r}: expected a byte count such as 2000000000, '500MB', "
                                  "'5GiB' or mergekit's '5B' (five billion)")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _SIZE_UNITS[unit])
    if size <= 0:
        raise CheckpointError(f"shard size {value!r}: must be more than 0 bytes")
    return size


def _owned(tensor: torch.Tensor, pending_storages: set[int]) -> torch.Tensor:
    """A CPU, contiguous tensor that alone covers its storage, as safetensors requires.

    Views (slices, transposes, tensors sharing storage with one already queued, such as a
    tied weight added under two names) are copied; a fresh tensor is kept as is.
    """
    tensor = tensor.detach().to("cpu")
    nbytes = tensor.numel() * tensor.element_size()
    storage = tensor.untyped_storage()
    if (
        not tensor.is_contiguous()
        or tensor.storage_offset() != 0
        or storage.nbytes() != nbytes
        or (nbytes > 0 and storage.data_ptr() in pending_storages)
    ):
        return tensor.contiguous().clone()
    return tensor


class ShardedWriter:
    """Write tensors to ``directory`` as safetensors shards of at most ``max_shard_bytes``.

    A tensor larger than the shard size gets a shard of its own. ``close`` returns the
    weight map (tensor name -> file name). Queued tensors are kept by reference until their
    shard is written: do not modify a tensor in place after adding it.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        filename_prefix: str = "model",
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.prefix = filename_prefix
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._pending_storages: set[int] = set()
        self._written: list[tuple[Path, list[str]]] = []  # temporary shard file, its tensors
        self._names: set[str] = set()
        self._total_bytes = 0
        self._total_parameters = 0
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``name``; writes out the current shard first if it is full."""
        if self._closed:
            raise RuntimeError("ShardedWriter.add after close")
        if name in self._names:
            raise ValueError(f"tensor {name!r} was already written")
        tensor = _owned(tensor, self._pending_storages)
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._names.add(name)
        self._pending[name] = tensor
        self._pending_storages.add(tensor.untyped_storage().data_ptr())
        self._pending_bytes += size
        self._total_bytes += size
        self._total_parameters += tensor.numel()
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        temporary = self.directory / f".{self.prefix}-shard-{len(self._written) + 1:05d}.safetensors.partial"
        shard = _ShardFile(temporary, [(n, t.dtype, tuple(t.shape)) for n, t in self._pending.items()])
        self._written.append((temporary, list(self._pending)))  # deleted by abort if a write fails
        try:
            for name, tensor in self._pending.items():
                shard.write(name, tensor)
        finally:
            shard.close()
        self._pending = {}
        self._pending_storages = set()
        self._pending_bytes = 0

    def close(self) -> dict[str, str]:
        """Write the last shard, give shards their final names, write the index; return the weight map."""
        if self._closed:
            raise RuntimeError("ShardedWriter.close called twice")
        self._flush()
        self._closed = True
        return finish_shards(self.directory, self.prefix, list(self._written),
                             self._total_bytes, self._total_parameters)

    def abort(self) -> None:
        """Drop buffered tensors and delete shards written so far."""
        self._pending = {}
        self._pending_storages = set()
        self._closed = True
        for temporary, _ in self._written:
            temporary.unlink(missing_ok=True)
        self._written = []

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def finish_shards(directory: Path, prefix: str, shards: list[tuple[Path, list[str]]], total_bytes: int,
                  total_parameters: int) -> dict[str, str]:
    """Give written shards (temporary path, tensor names) their final names and write the index
    (only for several shards, as transformers does); no shard at all becomes an empty
    ``PREFIX.safetensors``. Returns the weight map. Both writers end here."""
    if not shards:
        _ShardFile(directory / f"{prefix}.safetensors", []).close()
        return {}
    count = len(shards)
    weight_map: dict[str, str] = {}
    for number, (temporary, names) in enumerate(shards, start=1):
        final = f"{prefix}.safetensors" if count == 1 else f"{prefix}-{number:05d}-of-{count:05d}.safetensors"
        os.replace(temporary, directory / final)
        weight_map.update({name: final for name in names})
    if count > 1:
        index = {"metadata": {"total_size": total_bytes, "total_parameters": total_parameters},
                 "weight_map": dict(sorted(weight_map.items()))}
        (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n",
                                                                     encoding="utf-8")
    return weight_map


def shard_groups(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in order: a shard is closed when the next tensor would push it past
    ``max_shard_bytes`` or when it reaches that size (a larger tensor gets a shard of its own)."""
    groups: list[list[str]] = []
    pending: list[str] = []
    pending_bytes = 0
    for name, size in sizes:
        if pending and pending_bytes + size > max_shard_bytes:
            groups.append(pending)
            pending, pending_bytes = [], 0
        pending.append(name)
        pending_bytes += size
        if pending_bytes >= max_shard_bytes:
            groups.append(pending)
            pending, pending_bytes = [], 0
    if pending:
        groups.append(pending)
    return groups


class _ShardFile:
    """One safetensors file of known tensors (name, dtype, shape, in file order), created with its header.

    The data region is allocated up front; :meth:`write` puts a tensor, or any flat range of it,
    at its place with ``pwrite`` (several threads may write at once, each to its own bytes).
    """

    def __init__(self, path: Path, layout: list[tuple[str, str, tuple[int, ...]]]) -> None:
        self.path = path
        header: dict[str, object] = {"__metadata__": dict(SAFETENSORS_METADATA)}
        places: dict[str, tuple[int, int, str]] = {}
        position = 0
        for name, dtype, shape in layout:
            count = 1
            for dim in shape:
                count *= dim
            described = dtype_info(dtype)
            nbytes = count * described.itemsize
            header[name] = {"dtype": described.tag, "shape": list(shape), "data_offsets": [position, position + nbytes]}
            places[name] = (position, nbytes, described.name)
            position += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.pwrite(self.fd, len(encoded).to_bytes(8, "little") + encoded, 0)
            data_start = 8 + len(encoded)
            os.ftruncate(self.fd, data_start + position)
        except BaseException:
            os.close(self.fd)
            raise
        self.places = {name: (data_start + begin, nbytes, dtype) for name, (begin, nbytes, dtype) in places.items()}

    def write(self, name: str, values: torch.Tensor | np.ndarray, start: int = 0) -> None:
        """Write ``values`` (any shape, the tensor's dtype, on the CPU) at flat entry ``start`` of ``name``.

        ``values`` is a tensor, or a numpy array of the dtype's storage (:func:`~shoal.checkpoint.dtypes.storage`:
        ``bfloat16`` as its ``uint16`` bits).
        """
        offset, nbytes, dtype = self.places[name]
        if isinstance(values, np.ndarray):
            if values.dtype != dtype_info(dtype).storage:
                raise ValueError(f"tensor {name!r} is {dtype} (held as {dtype_info(dtype).storage}), "
                                 f"got an array of {values.dtype}")
            size = values.itemsize
            data = memoryview(np.ascontiguousarray(values).reshape(-1).view(np.uint8))
        else:
            if name_of(values.dtype) != dtype:
                raise ValueError(f"tensor {name!r} is torch.{dtype}, got {values.dtype}")
            values = values.detach().contiguous()
            size = values.element_size()
            data = memoryview(values.reshape(-1).view(torch.uint8).numpy())
        begin = start * size
        if begin + len(data) > nbytes:
            raise ValueError(f"write past the end of tensor {name!r}")
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + begin + done)

    def close(self) -> None:
        os.close(self.fd)


class ShardWriter:
    """Write tensors whose names, dtypes and shapes are known in advance, in any order and in pieces.

    Every shard file is created up front with its final header (:class:`_ShardFile`), so a
    tensor (or any flat range of it) is written straight to its place and nothing is buffered:
    memory does not grow with the shard size. Shards are split by :func:`shard_groups` and get
    their final names and the index on :meth:`close`. :meth:`write` may be called from several
    threads at once (each piece goes to its own bytes).
    """

    def __init__(self, directory: Path, layout: list[tuple[str, Any, tuple[int, ...]]], *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, filename_prefix: str = "model") -> None:
        """``layout``: (name, dtype, shape) of every tensor; a dtype is a name (``"bfloat16"``) or a ``torch.dtype``."""
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = filename_prefix
        specs: dict[str, tuple[str, tuple[int, ...]]] = {}
        sizes = []
        for name, dtype, shape in layout:
            if name in specs:
                raise ValueError(f"tensor {name!r} appears twice in the layout")
            count = 1
            for dim in shape:
                count *= dim
            specs[name] = (name_of(dtype), tuple(shape))
            sizes.append((name, count * dtype_info(dtype).itemsize))
        self._total_bytes = sum(size for _, size in sizes)
        self._total_parameters = sum(size // dtype_info(specs[name][0]).itemsize for name, size in sizes)
        self._files: list[tuple[_ShardFile, list[str]]] = []
        self._where: dict[str, _ShardFile] = {}
        self._closed = False
        try:
            for number, names in enumerate(shard_groups(sizes, max_shard_bytes), start=1):
                temporary = self.directory / f".{self.prefix}-shard-{number:05d}.safetensors.partial"
                shard = _ShardFile(temporary, [(name, *specs[name]) for name in names])
                self._files.append((shard, names))
                self._where.update({name: shard for name in names})
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, values: torch.Tensor | np.ndarray, start: int = 0) -> None:
        """Write ``values`` (a tensor, or an array as :meth:`_ShardFile.write` takes it) at flat entry ``start``."""
        self._where[name].write(name, values, start)

    def close(self) -> dict[str, str]:
        """Close the shards, give them their final names, write the index; return the weight map."""
        if self._closed:
            raise RuntimeError("ShardWriter.close called twice")
        self._closed = True
        for shard, _ in self._files:
            shard.close()
        return finish_shards(self.directory, self.prefix, [(shard.path, names) for shard, names in self._files],
                             self._total_bytes, self._total_parameters)

    def abort(self) -> None:
        """Close and delete the shard files."""
        if not self._closed:
            for shard, _ in self._files:
                shard.close()
        self._closed = True
        for shard, _ in self._files:
            shard.path.unlink(missing_ok=True)
        self._files = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()
