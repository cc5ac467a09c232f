"""Lazy, one-tensor-at-a-time reading of a checkpoint.

``open_checkpoint`` accepts a Hugging Face model folder (one ``model.safetensors`` or a
sharded index), a single weight file, an index file, or a hub id. Shapes and dtypes come
from the validated safetensors headers without reading tensor data. Three ways to read:
``get`` (one whole tensor, converted to a dtype and device), ``read_ranges`` (flat ranges,
copied) and ``map_range`` (a flat range as a view of the file's pages, for chunked work).
``read_array`` and ``map_array`` are the last two as numpy arrays of the stored bits
(:func:`shoal.checkpoint.dtypes.storage`), for callers that work without torch: nothing here
imports torch until a tensor is asked for.

Sources that change while they are read are refused, never mixed: each file's identity (device,
inode, size, mtime) is taken when its header is read, compared whenever it is opened and read,
and by :meth:`CheckpointReader.check_unchanged` before an output is moved into place. A file is
memory-mapped only while this reader holds a read lease on it (Linux ``F_SETLEASE``): a process
that then opens it for writing or truncates it waits until the lease is given up, and the next
mapped read refuses with an error naming the file, instead of the process dying of SIGBUS on a
page that vanished. Without a lease (another process has the file open for writing, a
filesystem without leases, a file of another user) ranges are copied with positioned reads
(:mod:`shoal.checkpoint.file_guard`).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Sequence

import numpy as np

from shoal.checkpoint.dtypes import storage, torch_dtype
from shoal.checkpoint.finite import all_finite
from shoal.checkpoint.hub import download_checkpoint, hub_cache_root, looks_like_hub_id
from shoal.checkpoint.locate import WeightFiles, locate_weights, read_config
from shoal.checkpoint.pickle_weights import load_pickle_state_dict, refuse_pickle
from shoal.checkpoint.file_guard import changed_error, fd_identity, lease_held, path_identity, take_read_lease
from shoal.checkpoint.safetensors_header import TensorEntry, read_header
from shoal.errors import CheckpointError

if TYPE_CHECKING:
    import torch


_FAULT_AROUND = 1 << 21  # bytes Linux may map around a read fault of a file mapping (see release_range)


class CheckpointReader:
    """Read access to the tensors of one checkpoint. Use :func:`open_checkpoint` to make one.

    Attributes: ``source`` (what the user named), ``path`` (local folder, or the weight
    file when one file was named), ``config`` (``config.json`` beside the weights, or None).
    """

    def __init__(self, source: str, path: Path, files: WeightFiles, config: dict | None) -> None:
        self.source = source
        self.path = path
        self.config = config
        self.files = files
        self._shard_of: dict[str, Path] = {}
        self._entries: dict[str, TensorEntry] = {}
        self._data_start: dict[Path, int] = {}
        self._fds: dict[Path, int] = {}
        self._mappings: dict[Path, mmap.mmap] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._identity: dict[Path, tuple[int, int, int, int]] = {}  # at header read (see check_unchanged)
        self._leased: dict[Path, bool] = {}  # shard -> whether a read lease on it is held (map_range)
        if files.format == "safetensors":
            self._index_safetensors()
        else:
            self._index_pickle()

    # -- building the name -> shard table --------------------------------------------------

    def _index_safetensors(self) -> None:
        wanted = self.files.weight_map
        for shard in self.files.shards:
            header = read_header(shard)
            self._data_start[shard] = header.data_start
            self._identity[shard] = header.identity
            for entry in header.tensors:
                if wanted is not None and wanted.get(entry.name) != shard:
                    continue  # listed under another shard, or not in the index at all
                self._entries[entry.name] = entry
                self._shard_of[entry.name] = shard
        self._check_index_complete()

    def _index_pickle(self) -> None:
        wanted = self.files.weight_map
        for shard in self.files.shards:
            for name in self._load_pickle(shard):
                if wanted is not None and wanted.get(name) != shard:
                    continue
                self._shard_of[name] = shard
        self._check_index_complete()

    def _check_index_complete(self) -> None:
        if self.files.weight_map is None:
            return
        for name, shard in self.files.weight_map.items():
            if name not in self._shard_of:
                raise CheckpointError(
                    f"{self.files.index}: entry {name!r} says the tensor is in {shard.name}, "
                    f"but {shard} has no such tensor"
                )

    def _load_pickle(self, shard: Path) -> dict[str, torch.Tensor]:
        if shard not in self._pickled:
            before = path_identity(shard)
            self._pickled[shard] = load_pickle_state_dict(shard)
            self._identity.setdefault(shard, before)
            self._check_same(shard, path_identity(shard), "while it was loaded")
        return self._pickled[shard]

    # -- the public surface ----------------------------------------------------------------

    def tensor_names(self) -> list[str]:
        """All tensor names, in the order they are stored (shard by shard, by file offset)."""
        return list(self._shard_of)

    def __contains__(self, name: object) -> bool:
        return name in self._shard_of

    def __len__(self) -> int:
        return len(self._shard_of)

    def _shard(self, name: str) -> Path:
        try:
            return self._shard_of[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}") from None

    def shard_path(self, name: str) -> Path:
        """The file that holds ``name``."""
        return self._shard(name)

    def shape(self, name: str) -> tuple[int, ...]:
        shard = self._shard(name)
        if name in self._entries:
            return self._entries[name].shape
        return tuple(self._load_pickle(shard)[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        shard = self._shard(name)
        if name in self._entries:
            return torch_dtype(self._entries[name].dtype_name)
        return self._load_pickle(shard)[name].dtype

    def dtype_name(self, name: str) -> str:
        """The dtype as :mod:`shoal.checkpoint.dtypes` names it (no torch import for safetensors storage)."""
        shard = self._shard(name)
        if name in self._entries:
            return self._entries[name].dtype_name
        return str(self._load_pickle(shard)[name].dtype).removeprefix("torch.")

    def nbytes(self, name: str) -> int:
        shard = self._shard(name)
        if name in self._entries:
            return self._entries[name].nbytes
        tensor = self._load_pickle(shard)[name]
        return tensor.numel() * tensor.element_size()

    def get(
        self,
        name: str,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        check_finite: bool = True,
    ) -> torch.Tensor:
        """Read tensor ``name``, converted to ``dtype`` (default: as stored) on ``device``.

        Safetensors storage is read with positioned reads (:meth:`read_ranges`), not a memory
        map, so the pages read do not stay in this process's resident memory: reading tensor by
        tensor keeps it flat in model size. With ``check_finite``, a NaN or Inf in a
        floating-point tensor is a :class:`CheckpointError` naming the file and the tensor.
        """
        shard = self._shard(name)
        if name in self._entries:
            entry = self._entries[name]
            tensor = self.read_ranges(name, [(0, entry.nbytes // entry.itemsize)]).view(entry.shape)
        else:
            tensor = self._load_pickle(shard)[name]
        # `.to` returns the same object when nothing changes; a pickled tensor must not be
        # handed out by reference, or a caller's in-place edit would change the cache.
        converted = tensor.to(device=device, dtype=dtype or tensor.dtype)
        if converted is tensor and name not in self._entries:
            converted = tensor.clone()
        if check_finite and converted.is_floating_point() and not all_finite(converted):
            import torch

            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                count = int((~torch.isfinite(tensor)).sum())
                raise CheckpointError(f"{shard}: tensor {name!r} contains {count} NaN or Inf values")
            raise CheckpointError(
                f"{shard}: tensor {name!r} overflows to Inf when converted from {tensor.dtype} to {converted.dtype}"
            )
        return converted

    def can_read_range(self, name: str) -> bool:
        """Whether :meth:`read_ranges` and :meth:`map_range` work for ``name`` (safetensors storage, not pickle)."""
        return name in self._entries

    def read_ranges(self, name: str, bounds: Sequence[tuple[int, int]]) -> torch.Tensor:
        """The entries of ranges ``(start, stop)`` of tensor ``name`` (flat, row-major), one after another, as stored.

        Positioned reads (``pread``) into one new buffer: no memory map, so the pages read do
        not stay in this process's resident memory, and safe from several threads at once. No
        finiteness check (see :meth:`check_range`).
        """
        return _as_tensor(self.read_array(name, bounds), self.dtype_name(name))

    def read_array(self, name: str, bounds: Sequence[tuple[int, int]]) -> np.ndarray:
        """:meth:`read_ranges` as a numpy array of the stored bits (``bfloat16`` as ``uint16``)."""
        dtype, shard = self._where(name, 0, 0)[2:]  # a tensor not in a safetensors file raises here
        places = [self._where(name, start, stop) for start, stop in bounds]
        self._check_same(shard, fd_identity(self._fd(shard)), "while it was read")
        buffer = np.empty(sum(nbytes for _, nbytes, _, _ in places), dtype=np.uint8)
        view = memoryview(buffer)
        at = 0
        for offset, nbytes, _, shard in places:
            fd = self._fd(shard)
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [view[at + done:at + nbytes]], offset + done)
                if got <= 0:
                    raise CheckpointError(f"{shard}: file ended while reading tensor {name!r}")
                done += got
            at += nbytes
        return buffer.view(storage(dtype))

    def map_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Entries ``[start, stop)`` of tensor ``name`` as :meth:`read_ranges` reads them, without copying them.

        A view of the file's pages, mapped copy-on-write (a write to the view changes this
        process's copy, never the file). The pages count in this process's resident memory
        until :meth:`release_range` lets them go: for ranges worked on one at a time, as the
        chunked merge does, where a copy of each range would double the memory traffic.
        Safe to call from several threads at once. No finiteness check.
        """
        return _as_tensor(self.map_array(name, start, stop), self.dtype_name(name))

    def map_array(self, name: str, start: int, stop: int) -> np.ndarray:
        """:meth:`map_range` as a numpy array of the stored bits (``bfloat16`` as ``uint16``), not copied."""
        offset, nbytes, dtype, shard = self._where(name, start, stop)
        if nbytes == 0:
            return np.empty(0, dtype=storage(dtype))
        fd = self._fd(shard)
        if shard not in self._leased:  # taken before the first mapping, which then keeps it
            self._leased[shard] = take_read_lease(fd)
        if not self._leased[shard]:
            return self.read_array(name, [(start, stop)])
        if not lease_held(fd):  # a writer waits for the lease to go
            raise CheckpointError(f"{shard}: another process opened the file for writing or truncated it "
                                  f"while tensor {name!r} was read; nothing was merged from a changed file")
        return np.frombuffer(self._mapping(shard), dtype=storage(dtype), count=stop - start, offset=offset)

    def release_range(self, name: str, start: int, stop: int) -> None:
        """Unmap the pages of a :meth:`map_range` (views of them read the file again if used after)."""
        offset, nbytes, _, shard = self._where(name, start, stop)
        mapping = self._mappings.get(shard)
        if mapping is None or nbytes == 0:
            return
        # A read fault maps more than its page: those around it that are in the page cache
        # (fault-around, 64 KiB aligned) or the whole large folio it is in (up to 2 MiB, aligned).
        # Without the margin, those of ranges already let go would stay mapped; a neighbouring
        # range in use loses its pages at worst, and maps them again.
        first = max(0, offset - offset % _FAULT_AROUND)
        last = offset + nbytes + (-(offset + nbytes)) % _FAULT_AROUND
        mapping.madvise(mmap.MADV_DONTNEED, first, min(last, len(mapping)) - first)

    def _where(self, name: str, start: int, stop: int) -> tuple[int, int, str, Path]:
        """(offset in its shard, byte count, dtype, shard) of entries ``[start, stop)`` of safetensors tensor ``name``."""
        entry = self._entries.get(name)
        if entry is None:
            self._shard(name)  # an unknown name raises the usual error
            raise CheckpointError(f"{self._shard_of[name]}: tensor {name!r} is not in a safetensors file")
        itemsize = entry.itemsize
        count = entry.nbytes // itemsize
        if not 0 <= start <= stop <= count:
            raise ValueError(f"range [{start}, {stop}) outside tensor {name!r} of {count} entries")
        shard = self._shard_of[name]
        return (self._data_start[shard] + entry.begin + start * itemsize, (stop - start) * itemsize, entry.dtype_name,
                shard)

    def _mapping(self, shard: Path) -> mmap.mmap:
        mapping = self._mappings.get(shard)
        if mapping is None:
            try:
                mapping = mmap.mmap(self._fd(shard), 0, access=mmap.ACCESS_COPY)
            except OSError as exc:
                raise CheckpointError(f"{shard}: cannot map file: {exc.strerror or exc}") from exc
            kept = self._mappings.setdefault(shard, mapping)  # another thread may have mapped it meanwhile
            if kept is not mapping:
                mapping.close()
                mapping = kept
        return mapping

    def check_range(self, name: str, values: torch.Tensor) -> None:
        """Raise what :meth:`get` raises when a slice of tensor ``name`` holds a NaN or Inf."""
        if not all_finite(values):
            self.get(name)  # counts them over the whole tensor and raises
            raise CheckpointError(f"{self._shard_of[name]}: tensor {name!r} contains NaN or Inf values")

    def _fd(self, shard: Path) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            try:
                fd = os.open(shard, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(f"{shard}: cannot open file: {exc.strerror or exc}") from exc
            try:
                self._check_same(shard, fd_identity(fd), "since its header was read")
            except BaseException:
                os.close(fd)
                raise
            kept = self._fds.setdefault(shard, fd)  # another thread may have opened it meanwhile
            if kept != fd:
                os.close(fd)
                fd = kept
        return fd

    def _check_same(self, shard: Path, now: tuple[int, int, int, int], when: str) -> None:
        then = self._identity.get(shard)
        if then is not None and now != then:
            raise changed_error(shard, then, now, when)

    def check_unchanged(self) -> None:
        """Raise :class:`CheckpointError` naming the first weight file replaced or rewritten since it was opened."""
        for shard in self._identity:
            try:
                now = path_identity(shard)
            except OSError:
                raise CheckpointError(f"{shard}: the file was removed while it was read") from None
            self._check_same(shard, now, "while it was read")

    def close(self) -> None:
        """Release file handles and any loaded pickle shards."""
        self._pickled.clear()
        for mapping in self._mappings.values():
            try:
                mapping.close()
            except BufferError:  # a view of it is still alive: unmapped when that goes
                pass
        self._mappings.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._leased.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({self.source!r}, {len(self)} tensors, {self.files.format})"


def _as_tensor(values: np.ndarray, dtype: str) -> torch.Tensor:
    """A tensor of ``dtype`` over an array of its stored bits (no copy)."""
    import torch

    return torch.from_numpy(values).view(torch_dtype(dtype))


def open_checkpoint(
    source: str | Path, *, allow_pickle: bool = False, revision: str | None = None
) -> CheckpointReader:
    """Open a checkpoint for lazy reading.

    ``source`` is a model folder, a ``.safetensors`` file, an ``*.index.json`` file, a
    pickle file (only with ``allow_pickle``), or a Hugging Face hub id (downloaded into the
    hub cache; ``revision`` picks a branch, tag or commit). Every safetensors header is
    validated before use; every problem is a :class:`CheckpointError` naming the file. Diffusion
    pipelines open as a :class:`~shoal.checkpoint.diffusion.DiffusionCheckpoint`.
    """
    from shoal.checkpoint import diffusion

    name = str(source)
    local = Path(name).expanduser()
    if diffusion.is_pipeline_folder(local):
        return diffusion.open_pipeline_folder(local, name)  # type: ignore[return-value]
    root: Path | None = None
    if not local.exists():
        if isinstance(source, Path) or not looks_like_hub_id(name):
            raise CheckpointError(f"{name}: no such file or folder (and not a Hugging Face hub id)")
        local = download_checkpoint(name, revision=revision, allow_pickle=allow_pickle)
        root = hub_cache_root(local)
    files = locate_weights(local, root)
    if files.format == "pickle" and not allow_pickle:
        raise refuse_pickle(files.index or files.shards[0])
    folder = local if local.is_dir() else local.parent
    path = folder if files.index is not None else local
    return diffusion.by_components(CheckpointReader(name, path, files, read_config(folder)))
