"""Process-wide runtime settings in one place: torch's thread count, the garbage collector, the allocator.

Library code never changes these on its own. The CLI enters :func:`runtime_settings` around
a command; a Python caller who wants the same behaviour enters it too::

    from shoal.runtime import runtime_settings

    with runtime_settings(threads=8, gc="freeze", trim_allocator=True):
        shoal.merge.merge("recipe.yaml", "out")

- ``threads``: torch's intra-op thread count inside the context (None: leave it), also the
  default worker count of the merge's chunk pool (:func:`worker_threads`).
- ``gc="freeze"``: objects alive when the context starts, and at each :func:`settle` (after
  heavy imports such as torch or numba), are set aside from garbage collection. Python's
  full collections would otherwise walk those hundreds of thousands of lasting objects again
  and again while a merge allocates many small temporaries. Collection itself stays on.
- ``trim_allocator``: freed C-heap memory goes back to the system every few chunks of a
  streamed merge (glibc ``malloc_trim``; a no-op elsewhere). Worker threads allocate from
  their own arenas, which keep chunk-sized temporaries freed between small long-lived
  results: without trimming, resident memory grows with the number of chunks.
- ``numba_blas_probe=False``: when shoal's fused loops first import numba inside the context,
  numba's import-time check for scipy's BLAS finds none. The check imports ``scipy.linalg``
  (a few tenths of a second) only to choose how ``np.correlate`` / ``np.convolve`` run in
  compiled code, which shoal's loops do not use; numba's ``np.dot`` still finds the BLAS when
  it is compiled. It changes numba for the rest of the process, so only a caller that owns the
  process (the CLI) turns it off.

On exit every setting is put back as it was found (objects frozen before the context began
cannot be told apart from those frozen inside it: then all stay frozen). Contexts nest; the
innermost wins.
:func:`collection_paused` turns automatic collection off for a block (heavy imports).
"""

from __future__ import annotations

import gc as _gc
import itertools
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

GcMode = Literal["default", "freeze"]

TRIM_EVERY = 16  # chunks between two returns of freed memory to the system


@dataclass(frozen=True)
class RuntimeSettings:
    """The settings of the innermost active :func:`runtime_settings` context."""

    threads: int | None = None
    gc: GcMode = "default"
    trim_allocator: bool = False
    numba_blas_probe: bool = True


_DEFAULT = RuntimeSettings()
_active: list[RuntimeSettings] = []  # process-wide, as the settings themselves; worker threads read it
_lock = threading.Lock()


def current() -> RuntimeSettings:
    """The active settings (defaults: nothing changed) when no context is entered."""
    return _active[-1] if _active else _DEFAULT


@contextmanager
def runtime_settings(*, threads: int | None = None, gc: GcMode = "default", trim_allocator: bool = False,
                     numba_blas_probe: bool = True) -> Iterator[RuntimeSettings]:
    """Apply process-wide settings for the duration of the ``with`` block; restore them after."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    if gc not in ("default", "freeze"):
        raise ValueError(f"gc must be 'default' or 'freeze', got {gc!r}")
    settings = RuntimeSettings(threads=threads, gc=gc, trim_allocator=trim_allocator,
                               numba_blas_probe=numba_blas_probe)
    torch_threads = _set_torch_threads(threads) if threads is not None else None
    frozen_before = _gc.get_freeze_count()
    if gc == "freeze":
        _gc.freeze()
    with _lock:
        _active.append(settings)
    try:
        yield settings
    finally:
        with _lock:
            _active.remove(settings)
        if gc == "freeze" and frozen_before == 0 and not any(s.gc == "freeze" for s in _active):
            _gc.unfreeze()
        if torch_threads is not None:
            _set_torch_threads(torch_threads)


@contextmanager
def collection_paused() -> Iterator[None]:
    """No automatic garbage collection inside the block (heavy imports: their collections find no garbage)."""
    enabled = _gc.isenabled()
    _gc.disable()
    try:
        yield
    finally:
        if enabled:
            _gc.enable()


def settle() -> None:
    """Under ``gc="freeze"``, set aside the objects alive now (call after heavy imports); else nothing."""
    if current().gc == "freeze":
        _gc.freeze()


@contextmanager
def numba_first_import() -> Iterator[None]:
    """Around the import that may load numba first: with ``numba_blas_probe=False``, its BLAS check finds none."""
    if current().numba_blas_probe or "numba" in sys.modules:
        yield
        return
    blocked = [name for name in _NUMBA_BLAS_PROBE if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # an import of it raises ImportError
    try:
        yield
    finally:
        for name in blocked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


_NUMBA_BLAS_PROBE = ("scipy.linalg.cython_blas", "scipy.linalg.cython_lapack")


def worker_threads() -> int:
    """How many worker threads a pool should use: the context's ``threads``, else torch's own count.

    Without torch imported, the count torch would start with: ``OMP_NUM_THREADS``, else the
    physical cores this process may run on.
    """
    threads = current().threads
    if threads is not None:
        return threads
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        return int(torch.get_num_threads())
    return _default_threads()


def _default_threads() -> int:
    import os

    try:
        requested = int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0])
    except ValueError:
        requested = 0
    if requested > 0:
        return requested
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:  # hyperthreads of one core share it
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as siblings:
                cores.add(siblings.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


_torch_threads = threading.local()


def one_torch_thread() -> None:
    """In a pool's worker thread: torch's intra-op threads for this thread set to 1, once torch is imported.

    Called before each job; a no-op until some job (or the caller) imports torch.
    """
    if getattr(_torch_threads, "set", False):
        return
    torch = sys.modules.get("torch")
    set_threads = getattr(torch, "set_num_threads", None) if torch is not None else None
    if set_threads is not None:
        set_threads(1)
        _torch_threads.set = True


def _set_torch_threads(threads: int) -> int:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    return previous


def _malloc_trim() -> Callable[[], object] | None:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc
        return None


_trim = _malloc_trim()
_calls = itertools.count(1)  # thread-safe increments


def chunk_done() -> None:
    """Called after each chunk of a streamed merge: under ``trim_allocator``, trims every few calls."""
    if _trim is not None and current().trim_allocator and next(_calls) % TRIM_EVERY == 0:
        _trim(0)
