"""Where candidates are evaluated: in the coordinating process, or in local worker processes.

The coordinator is the only process that talks to the Optuna study: it asks the sampler for
a candidate, hands the genome to a free evaluator and tells the study the outcome. So there
is one sampler (workers cannot draw the same candidates from copies of one seed), the trial
budget is met exactly (a candidate is asked for only while completed + running < budget),
and a worker never writes to the study, even if it outlives its coordinator.

Evaluator processes die with their coordinator (``PR_SET_PDEATHSIG`` on Linux, and a check
of the parent's pid everywhere), so a kill -9 of the coordinator leaves no worker behind.

Each evaluator runs torch with ``threads`` threads (one by default): on a shared machine
torch's default (every core) makes concurrent evaluators fight over the cores.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from shoal.errors import ConfigError


@dataclass(frozen=True)
class Outcome:
    """The result of one candidate: a fitness with trial attributes, or the error it raised."""

    key: int
    value: float | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Evaluations(Protocol):
    """Evaluators the search loop hands genomes to (:func:`shoal.evolve.search.run_trials`)."""

    capacity: int  # candidates evaluated at the same time

    def submit(self, key: int, genome: dict[str, float]) -> None: ...

    def collect(self) -> list[Outcome]:
        """Block until at least one submitted candidate is done; return every finished one."""
        ...

    def close(self) -> None: ...


@contextmanager
def evaluator_threads(threads: int) -> Iterator[None]:
    """Run the body with ``threads`` torch threads, restoring the caller's count afterwards.

    The one place where shoal's search sets torch's thread count (a candidate of a tiny
    model evaluated with torch's default threads on a loaded 2-core machine took 10x longer)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate(fitness: Callable[[dict[str, float]], tuple[float, dict]], key: int,
             genome: dict[str, float]) -> Outcome:
    """Score one genome; a candidate that raises (NaN weights, out of memory) is an outcome too."""
    import torch

    try:
        value, attrs = fitness(genome)
    except Exception as err:  # a failed candidate, recorded in the study and skipped
        return Outcome(key, error=f"{type(err).__name__}: {err}")
    return Outcome(key, float(value), {**attrs, "threads": torch.get_num_threads()})


class InProcess:
    """Evaluate in the calling process, one candidate at a time."""

    capacity = 1

    def __init__(self, fitness: Callable[[dict[str, float]], tuple[float, dict]]):
        self.fitness = fitness
        self.pending: list[tuple[int, dict[str, float]]] = []

    def submit(self, key: int, genome: dict[str, float]) -> None:
        self.pending.append((key, genome))

    def collect(self) -> list[Outcome]:
        key, genome = self.pending.pop(0)
        return [evaluate(self.fitness, key, genome)]

    def close(self) -> None:
        self.pending.clear()


@dataclass(frozen=True)
class WorkerSettings:
    """Process-wide settings an evaluator process takes over from its coordinator."""

    threads: int
    parent_pid: int
    progress_bars: bool  # transformers' / huggingface_hub's own bars, as the coordinator has them


def current_settings(threads: int) -> WorkerSettings:
    """The settings a worker started now inherits: the thread count asked for, and the
    caller's choice about third-party progress bars (a spawned process starts with defaults)."""
    from huggingface_hub.utils import are_progress_bars_disabled

    bars = not are_progress_bars_disabled()
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        bars = bars and hf_logging.is_progress_bar_enabled()
    return WorkerSettings(threads=threads, parent_pid=os.getpid(), progress_bars=bars)


def die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` (its coordinator) ends, even by kill -9."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the watchdog below
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above ran
        os._exit(1)

    def watch() -> None:
        while True:
            threading.Event().wait(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="shoal-parent-watch", daemon=True).start()


def apply_worker_settings(settings: WorkerSettings) -> None:
    """Take over the coordinator's settings in a fresh evaluator process."""
    import torch

    die_with_parent(settings.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's: it stops the workers
    torch.set_num_threads(settings.threads)
    if not settings.progress_bars:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # transformers reads this when it is imported
        if "transformers.utils.logging" in sys.modules:
            sys.modules["transformers.utils.logging"].disable_progress_bar()


def worker_main(config_data: dict, settings: WorkerSettings, jobs: Any, results: Any, index: int) -> None:
    """An evaluator process: build the resident candidate, then score the genomes it is sent."""
    apply_worker_settings(settings)
    from shoal.evolve.config import parse_evolve_config
    from shoal.evolve.evaluators import make_evaluator

    try:
        evaluator = make_evaluator(parse_evolve_config(config_data))
    except Exception as err:
        results.put((index, "startup", f"{type(err).__name__}: {err}"))
        return
    try:
        while (job := jobs.get()) is not None:
            key, genome = job
            results.put((index, "outcome", evaluate(evaluator.fitness, key, genome)))
    finally:
        evaluator.close()


class LocalWorkers:
    """``workers`` evaluator processes on this machine, one candidate each at a time."""

    def __init__(self, config_data: dict, workers: int, threads: int):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        settings = current_settings(threads)
        self.capacity = workers
        self.results = context.Queue()
        self.jobs = [context.Queue() for _ in range(workers)]
        self.busy: dict[int, int] = {}  # worker index -> key of the candidate it evaluates
        self.processes = [context.Process(target=worker_main, daemon=True, name=f"shoal-evaluator-{i}",
                                          args=(config_data, settings, self.jobs[i], self.results, i))
                          for i in range(workers)]
        for process in self.processes:
            process.start()

    def submit(self, key: int, genome: dict[str, float]) -> None:
        index = next(i for i in range(self.capacity) if i not in self.busy)
        self.busy[index] = key
        self.jobs[index].put((key, genome))

    def collect(self) -> list[Outcome]:
        outcomes: list[Outcome] = []
        while not outcomes:
            try:
                message = self.results.get(timeout=1.0)
            except queue.Empty:
                self._check_alive()
                continue
            outcomes.extend(self._handle(message))
            while True:  # and whatever else is already done
                try:
                    outcomes.extend(self._handle(self.results.get_nowait()))
                except queue.Empty:
                    break
        return outcomes

    def _handle(self, message: tuple) -> list[Outcome]:
        index, kind, payload = message
        if kind == "startup":
            raise ConfigError(f"evaluator process {index} could not start: {payload}")
        self.busy.pop(index, None)
        return [payload]

    def _check_alive(self) -> None:
        for index, process in enumerate(self.processes):
            if not process.is_alive():
                doing = f" while evaluating trial {self.busy[index]}" if index in self.busy else ""
                raise ConfigError(f"evaluator process {index} exited with code {process.exitcode}{doing}")

    def close(self) -> None:
        for index, process in enumerate(self.processes):
            if index in self.busy:  # a candidate nobody waits for any more (the search stopped)
                process.kill()
            elif process.is_alive():
                self.jobs[index].put(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        for q in [self.results, *self.jobs]:
            q.close()
            q.cancel_join_thread()
