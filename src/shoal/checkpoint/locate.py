"""Find the weight files of a checkpoint: a model folder, an index, or a single file.

A Hugging Face model folder holds either one ``model.safetensors`` or shards listed by
``model.safetensors.index.json`` (``{"weight_map": {tensor: shard file}}``), or the pickle
equivalents (``pytorch_model.bin`` / ``pytorch_model.bin.index.json``). Shard names in an
index come from the file, so they are checked to stay inside the folder: no absolute
paths, no ``..``, no symlink that resolves elsewhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class WeightFiles:
    """Where a checkpoint's tensors live.

    ``shards`` are in reading order. ``weight_map`` (tensor -> shard) is present when an
    index names the tensors; ``None`` means every tensor of every shard belongs.
    """

    format: str  # "safetensors" or "pickle"
    shards: tuple[Path, ...]
    weight_map: dict[str, Path] | None
    index: Path | None


def _resolve_shard(index: Path, tensor: str, entry: object, root: Path) -> Path:
    folder = index.parent
    where = f"{index}: entry {tensor!r} -> {entry!r}"
    if not isinstance(entry, str) or not entry:
        raise CheckpointError(f"{where}: the shard file name must be a non-empty string")
    relative = Path(entry)
    if relative.is_absolute() or ".." in relative.parts or entry.startswith("~"):
        raise CheckpointError(f"{where}: shard path points outside the folder {folder}")
    shard = folder / relative
    try:
        resolved = shard.resolve(strict=True)
    except (FileNotFoundError, RuntimeError, OSError):
        raise CheckpointError(f"{where}: shard file {shard} does not exist") from None
    real_root = root.resolve()
    if os.path.commonpath([resolved, real_root]) != str(real_root):
        raise CheckpointError(f"{where}: shard path resolves to {resolved}, outside the folder {folder}")
    if not resolved.is_file():
        raise CheckpointError(f"{where}: shard {shard} is not a file")
    return shard


def read_index(index: Path, root: Path | None = None) -> WeightFiles:
    """Parse and check a ``*.index.json`` shard index; shards are ordered by file name.

    Every shard must resolve (symlinks followed) inside ``root``, the index's folder by
    default. Hub downloads pass the repository's cache folder, whose snapshots link to
    shared blobs one level up.
    """
    root = index.parent if root is None else root
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{index}: cannot read index: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index}: index is not valid JSON ({exc})") from exc
    except RecursionError:
        raise CheckpointError(f"{index}: index is not valid JSON (nested too deeply)") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: index has no 'weight_map' object naming tensors and shards")
    resolved: dict[str, Path] = {}
    by_entry: dict[str, Path] = {}
    for tensor, entry in weight_map.items():
        if isinstance(entry, str) and entry in by_entry:
            resolved[tensor] = by_entry[entry]
            continue
        shard = _resolve_shard(index, tensor, entry, root)
        by_entry[entry] = shard
        resolved[tensor] = shard
    shards = tuple(sorted(set(by_entry.values()), key=lambda p: p.name))
    fmt = "pickle" if index.name.endswith(".bin.index.json") or any(
        s.suffix in PICKLE_SUFFIXES for s in shards
    ) else "safetensors"
    return WeightFiles(format=fmt, shards=shards, weight_map=resolved, index=index)


def _single(path: Path) -> WeightFiles:
    fmt = "safetensors" if path.suffix == ".safetensors" else "pickle"
    return WeightFiles(format=fmt, shards=(path,), weight_map=None, index=None)


def locate_weights(path: Path, root: Path | None = None) -> WeightFiles:
    """The weight files of ``path``: a model folder, an ``*.index.json`` file, or one weight file.

    ``root`` bounds where index entries may resolve (see :func:`read_index`).
    """
    if path.is_file():
        if path.name.endswith(".index.json"):
            return read_index(path, root)
        if path.suffix == ".safetensors" or path.suffix in PICKLE_SUFFIXES:
            return _single(path)
        raise CheckpointError(
            f"{path}: not a weight file (expected .safetensors, an .index.json, or a pickle .bin/.pt)"
        )
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    for name in (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, PICKLE_INDEX, PICKLE_SINGLE):
        candidate = path / name
        if candidate.is_file():
            return read_index(candidate, root) if name.endswith(".index.json") else _single(candidate)
    # Folders saved by other tools: accept exactly one index, else exactly one weight file.
    for pattern in ("*.safetensors.index.json", "*.safetensors", "*.bin.index.json", "*.bin", "*.pt", "*.pth"):
        found = sorted(p for p in path.glob(pattern) if p.is_file())
        if len(found) == 1:
            return read_index(found[0], root) if pattern.endswith(".index.json") else _single(found[0])
        if len(found) > 1:
            names = ", ".join(p.name for p in found[:4])
            raise CheckpointError(
                f"{path}: several weight files ({names}) and no {SAFETENSORS_INDEX} saying which belong "
                f"together; name one file, or add an index"
            )
    raise CheckpointError(
        f"{path}: no weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, or a single .safetensors file)"
    )


def read_config(folder: Path) -> dict | None:
    """``config.json`` in ``folder`` as a dict, or None when there is none."""
    path = folder / "config.json"
    return read_json_object(path, "model config") if path.is_file() else None


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object; any failure is one CheckpointError naming the file and ``what``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read {what}: {exc}") from exc
    except RecursionError:
        raise CheckpointError(f"{path}: cannot read {what}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data
