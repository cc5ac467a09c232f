"""Write a small ``.safetensors`` file (an SVF expert, an SVD cache) in one atomic step.

The file is written under a temporary name in the destination's folder and renamed over the
destination when complete, so a reader (or a process killed mid-write) never leaves or sees
half a file. Sharded model folders are written by :mod:`shoal.checkpoint.writer` instead.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch


def save_safetensors_atomically(tensors: Mapping[str, torch.Tensor], path: Path,
                                metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` (contiguous, CPU) and string ``metadata`` to ``path``; parents are
    created. Returns ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=dict(metadata) if metadata is not None else None)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp's 0600 would make the result private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
