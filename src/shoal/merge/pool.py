"""The chunk pool: worker threads for the streamed executor, and running jobs over ranges on it.

While a pool runs, torch's intra-op threads are 1 (the pool is the parallelism), the garbage
collector leaves the long-lived objects alone, and freed chunk memory goes back to the system
every few chunks (so resident memory does not grow with the model).
"""

from __future__ import annotations

import gc
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
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
            try:
                yield pool
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # the jobs queued (stages in flight) are dropped
                raise
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


@dataclass(frozen=True)
class Stage:
    """A pass over ranges: ``job`` on each (in parallel), then ``then`` of the results in range order.

    ``then`` returns the next stage, or the final value of the stages.
    """

    job: Job
    ranges: list[tuple[int, int]]
    then: Callable[[list[Any]], Any]


def start_stages(pool: ThreadPoolExecutor, first: Stage) -> Future:
    """Run ``first`` and the stages it leads to on ``pool`` without waiting; a future of the final value.

    ``then`` runs on the worker that finished a stage's last range, and queues the next
    stage's jobs behind whatever the pool was given meanwhile: several ops' stages can be in
    flight at once, so the workers do not wait for the end of one op's pass (or for the
    caller's serial work) while another op has work. An exception ends the stages and is
    the future's.
    """
    done: Future = Future()
    done.set_running_or_notify_cancel()

    def launch(stage: Stage) -> None:
        results: list[Any] = [None] * len(stage.ranges)
        left = [len(stage.ranges)]
        errors: list[BaseException] = []
        lock = threading.Lock()

        def run(index: int, bounds: tuple[int, int]) -> None:
            try:
                if not errors:  # a failed range: the others of the stage are skipped
                    results[index] = stage.job(*bounds)
                    _trim_memory()
            except BaseException as exc:  # handed to the caller through the future
                errors.append(exc)
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                if errors:
                    done.set_exception(errors[0])
                else:
                    advance(stage, results)

        if not stage.ranges:
            advance(stage, [])
        for index, bounds in enumerate(stage.ranges):
            pool.submit(run, index, bounds)

    def advance(stage: Stage, results: list[Any]) -> None:
        try:
            following = stage.then(results)
            if isinstance(following, Stage):
                launch(following)
            else:
                done.set_result(following)
        except BaseException as exc:  # also a pool shut down meanwhile (another op failed)
            done.set_exception(exc)

    launch(first)
    return done


def open_pools() -> int:
    """How many chunk pools are running (their garbage collector is frozen)."""
    return _open_pools
