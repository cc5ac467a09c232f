"""Streaming, sharded safetensors output in the Hugging Face layout.

Tensors are buffered until the next one would push the shard past ``max_shard_bytes``;
then the shard is written and the buffer freed, so memory stays near one shard. The number
of shards is known only at the end, so shards are written under temporary names and
renamed to ``model-00001-of-00003.safetensors`` on ``close``, which also writes
``model.safetensors.index.json`` (or leaves a single ``model.safetensors``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import TracebackType

import torch
from safetensors.torch import save_file

from shoal.errors import CheckpointError

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
SAFETENSORS_METADATA = {"format": "pt"}


_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_byte_size(value: int | str) -> int:
    """Bytes from ``"500MB"``, ``"5GB"`` (powers of 1000, as transformers counts), ``"2GiB"`` or ``1000``."""
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        if match is None or match.group(2).lower() not in _SIZE_UNITS:
            raise CheckpointError(f"shard size {value!r}: expected a byte count such as 2000000000, '500MB' or '5GiB'")
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
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        temporary = self.directory / f".{self.prefix}-shard-{len(self._written) + 1:05d}.safetensors.partial"
        save_file(self._pending, str(temporary), metadata=dict(SAFETENSORS_METADATA))
        self._written.append((temporary, list(self._pending)))
        self._pending = {}
        self._pending_storages = set()
        self._pending_bytes = 0

    def close(self) -> dict[str, str]:
        """Write the last shard, give shards their final names, write the index; return the weight map."""
        if self._closed:
            raise RuntimeError("ShardedWriter.close called twice")
        self._flush()
        self._closed = True
        if not self._written:
            single = self.directory / f"{self.prefix}.safetensors"
            save_file({}, str(single), metadata=dict(SAFETENSORS_METADATA))
            return {}
        count = len(self._written)
        weight_map: dict[str, str] = {}
        for number, (temporary, names) in enumerate(self._written, start=1):
            final = (
                f"{self.prefix}.safetensors"
                if count == 1
                else f"{self.prefix}-{number:05d}-of-{count:05d}.safetensors"
            )
            os.replace(temporary, self.directory / final)
            weight_map.update({name: final for name in names})
        if count > 1:
            index = {
                "metadata": {"total_size": self._total_bytes},
                "weight_map": dict(sorted(weight_map.items())),
            }
            index_path = self.directory / f"{self.prefix}.safetensors.index.json"
            index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return weight_map

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
