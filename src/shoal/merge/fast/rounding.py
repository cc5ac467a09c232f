"""Whether torch computes ``x.add_(y, alpha=w)`` as one fused multiply-add: asked of torch once, kept on disk.

The fused loops repeat torch's rounding, so they must know it; it is a property of the torch
build and the CPU (the kernel torch dispatches to), so the answer is kept in
``$SHOAL_CACHE/torch-rounding.json`` (else ``~/.cache/shoal``) under a key naming both: torch's
``version.py`` (version and git commit) and where it lies, ``ATEN_CPU_CAPABILITY``, the CPU's
model and flags. A process that finds its key there need not import torch at all; one that
has imported torch anyway asks it (a few microseconds) and writes nothing.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import numpy as np

_FILE = "torch-rounding.json"


@functools.lru_cache(maxsize=None)
def torch_fuses_alpha() -> bool | None:
    """Whether torch's ``add_`` with ``alpha`` fuses the multiply-add here (None: not consistently)."""
    import sys

    if "torch" in sys.modules:  # imported anyway: its own answer, nothing written
        return ask_torch()
    key = _machine_key()
    if key is not None:
        known = _cached().get(key, "missing")
        if known is None or isinstance(known, bool):
            return known
    found = ask_torch()
    if key is not None:
        _remember(key, found)
    return found


def ask_torch() -> bool | None:
    """torch's answer, on values where the fused and the two-step results differ, over a length that
    covers both torch's vector loop and its scalar tail (imports torch)."""
    import torch

    a = np.float32(1.0 + 2.0**-12)
    c = -np.float32(1.0 + 2.0**-11)
    fused = np.float32(np.float64(a) * np.float64(a) + np.float64(c))  # exact product, one rounding
    unfused = np.float32(np.float32(a * a) + c)
    assert fused != unfused
    got = torch.full((67,), float(c)).add_(torch.full((67,), float(a)), alpha=float(a)).numpy()
    if (got == fused).all():
        return True
    if (got == unfused).all():
        return False
    return None


def cache_file() -> Path:
    cache = os.environ.get("SHOAL_CACHE")
    return (Path(cache) if cache else Path.home() / ".cache" / "shoal") / _FILE


def _machine_key() -> str | None:
    """A digest of what torch's answer depends on, or None when torch's files cannot be found."""
    try:
        spec = importlib.util.find_spec("torch")
        if spec is None or not spec.submodule_search_locations:
            return None
        folder = Path(next(iter(spec.submodule_search_locations)))
        version = (folder / "version.py").read_bytes()
    except (OSError, ValueError, ImportError):
        return None
    parts = [str(folder.resolve()).encode(), version, os.environ.get("ATEN_CPU_CAPABILITY", "").encode(), _cpu()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()


def _cpu() -> bytes:
    """The CPU's model name and flags (Linux), else the platform's machine name."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        import platform

        return platform.machine().encode()
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    seen: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        name = name.strip()
        if name in wanted and name not in seen:
            seen[name] = value.strip()
    return json.dumps(seen, sort_keys=True).encode()


def _cached() -> dict:
    try:
        found = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _remember(key: str, value: bool | None) -> None:
    """Add the answer to the file (atomically; a cache that cannot be written is only slower)."""
    known = _cached()
    if key in known and known[key] == value:
        return
    known[key] = value
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{_FILE}.", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(known, out, sort_keys=True)
        os.replace(temporary, path)
    except OSError:
        Path(temporary).unlink(missing_ok=True)
