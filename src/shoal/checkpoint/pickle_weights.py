"""Pickle weight files (``pytorch_model.bin``, ``*.pt``), loaded only when the user allows it.

Unpickling can run arbitrary code, so shoal refuses these files unless asked
(``allow_pickle=True`` / ``--allow-pickle``), and even then loads them with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path

from shoal.checkpoint.lazy_torch import torch
from shoal.errors import CheckpointError


def refuse_pickle(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: is a pickle weight file, which can run code when loaded; shoal reads it only "
        f"with --allow-pickle (allow_pickle=True), and then with torch.load(weights_only=True). "
        f"Prefer converting it to .safetensors."
    )


def _unpickler_reason(exc: Exception) -> str:
    # torch's message suggests weights_only=False, which shoal never does; keep only the cause.
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    for marker in ("unsupported", "unpickler error"):
        for line in text.splitlines():
            if marker in line.lower():
                return line.split(" Please use")[0].strip().rstrip(":").strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a flat ``{name: tensor}`` mapping from ``path`` with ``weights_only=True``.

    Memory-maps the file when it uses torch's zip format (every file saved since torch 1.6);
    the legacy format is read into memory.
    """
    try:
        # torch warns (two lines on stderr) about pickle protocols it does not expect; whether
        # the file is refused or loaded, the error below or the tensors say all there is.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                # mmap needs the zip format; anything else is a real error.
                if zipfile.is_zipfile(path) or "mmap" not in str(exc):
                    raise
                loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused by torch.load(weights_only=True), it holds more than tensors "
            f"({_unpickler_reason(exc)})"
        ) from exc
    except Exception as exc:  # torch.load fails in many ways on a damaged file (even KeyError)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{path}: not a readable torch weight file ({type(exc).__name__}: {first_line})"
        ) from exc
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: expected a mapping of tensor names to tensors, got {type(loaded).__name__}")
    for name, value in loaded.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor "
                f"(expected a flat state dict of tensors)"
            )
    return loaded
