"""The chunk pool: worker threads for the streamed executor, and running jobs over ranges on it.

While a pool runs, torch's intra-op threads are 1 (the pool is the parallelism), the garbage
collector leaves the long-lived objects alone, and freed chunk memory goes back to the system
every few chunks (so resident memory does not grow with the model).
"""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

Job = Callable[[int, int], Any]  # (start, stop) -> anything

_open_pools = 0  # chunk_pool contexts running (their garbage collector is frozen)


@contextmanager
def chunk_pool(workers: int | None = None) -> Iterator[ThreadPoolExecutor]:
    """A pool of ``workers`` threads (default: torch's thread count) with torch's intra-op threads at 1."""
    previous = torch.get_num_threads()
    workers = workers or previous
    torch.set_num_threads(1)
    # The objects alive now (torch's and numba's modules: hundreds of thousands) are not garbage,
    # but every full collection the chunks' small allocations trigger would walk them all
    # (about 5% of a TIES merge's CPU time); set aside while the pool runs, then put back.
    global _open_pools
    gc.freeze()
    _open_pools += 1
    try:
        # OpenMP's thread count is per thread: each worker sets its own
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shoal-merge",
                                initializer=torch.set_num_threads, initargs=(1,)) as pool:
            yield pool
    finally:
        _open_pools -= 1
        gc.unfreeze()
        torch.set_num_threads(previous)


_TRIM_EVERY = 16  # chunks between two returns of freed memory to the system


def _memory_trimmer() -> Callable[[], None]:
    """A function that hands the C library's freed memory back to the system every few calls.

    Worker threads allocate from their own glibc arenas, and chunk-sized temporaries freed
    between small long-lived results (the TIES tallies) are kept by the arena: without this,
    resident memory grows with the number of chunks of a tensor, i.e. with the model size.
    A no-op where the C library is not glibc.
    """
    import ctypes
    import ctypes.util
    import itertools

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    calls = itertools.count(1)  # thread-safe increments

    def maybe_trim() -> None:
        if next(calls) % _TRIM_EVERY == 0:
            trim(0)

    return maybe_trim


_trim_memory = _memory_trimmer()


def ranges_of(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + chunk)) for start in range(0, n, chunk)] or [(0, 0)]


def run_all(pool: ThreadPoolExecutor, job: Job, ranges: list[tuple[int, int]]) -> list[Any]:
    """``job`` on every range, in parallel; results in range order."""
    def run(bounds: tuple[int, int]) -> Any:
        result = job(*bounds)
        _trim_memory()
        return result

    if len(ranges) == 1:
        return [run(ranges[0])]
    return list(pool.map(run, ranges))


def run_in_order(pool: ThreadPoolExecutor, job: Callable[[int, int, Any], None],
                  ranges: list[tuple[int, int]], prepare: Callable[[int, int], Any]) -> None:
    """``job(start, stop, prepare(start, stop))`` on every range; ``prepare`` runs here, in range order."""
    limit = 2 * (pool._max_workers or 1)
    pending: list[Any] = []
    def run(start: int, stop: int, prepared: Any) -> None:
        job(start, stop, prepared)
        _trim_memory()

    for start, stop in ranges:
        pending.append(pool.submit(run, start, stop, prepare(start, stop)))
        if len(pending) >= limit:
            pending.pop(0).result()
    for future in pending:
        future.result()


def open_pools() -> int:
    """How many chunk pools are running (their garbage collector is frozen)."""
    return _open_pools
