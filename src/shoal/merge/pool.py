"""The chunk pool: worker threads for the streamed executor, and passes (stages) over ranges on it.

Each worker runs torch with one intra-op thread (the pool is the parallelism; OpenMP's thread
count is per thread, so the caller's own setting is untouched), set before its first job once
torch is imported: the fused path never imports it. Process-wide settings (the
garbage collector, allocator trimming) are the caller's, through :mod:`shoal.runtime`.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from shoal.runtime import chunk_done, one_torch_thread, worker_threads

Job = Callable[[int, int], Any]  # (start, stop) -> anything


@contextmanager
def chunk_pool(workers: int | None = None) -> Iterator[ThreadPoolExecutor]:
    """A pool of ``workers`` threads (default: :func:`shoal.runtime.worker_threads`), one torch thread each."""
    with ThreadPoolExecutor(max_workers=workers or worker_threads(), thread_name_prefix="shoal-merge") as pool:
        try:
            yield pool
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the jobs queued (stages in flight) are dropped
            raise


def ranges_of(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + chunk)) for start in range(0, n, chunk)] or [(0, 0)]


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
                    one_torch_thread()
                    results[index] = stage.job(*bounds)
                    chunk_done()
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
