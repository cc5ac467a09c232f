"""Find a task by name.

- ``lmeval:<task>``: an lm-eval-harness task through the adapter (extra ``lmeval``);
- ``jsonl:<path>``: the user's own data, see :mod:`shoal.eval.jsonl_task`;
- anything else: a task of a registered *task provider*. Providers plug in with
  :func:`register_task_provider` or an entry point in the group ``shoal.tasks``
  (``name = "module:PROVIDER"``); the miniature world (``shoal.zoo``) is one. This module
  never imports the packages that plug into it.

A provider may know which seed's splits belong with a model (a zoo world's models were
trained on that world's ``train`` split), so that evaluations read the world's own splits:
see :func:`task_seed_of_models`.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

from shoal.errors import TaskError
from shoal.eval.task import Task

PROVIDER_GROUP = "shoal.tasks"


@runtime_checkable
class TaskProvider(Protocol):
    """A family of named tasks whose splits a seed fixes."""

    def names(self) -> Sequence[str]:
        """The task names this provider answers for."""
        ...

    def get(self, name: str, *, seed: int = 0) -> Task:
        """The task ``name`` with splits fixed by ``seed``."""
        ...

    def seed_of_model(self, folder: Path) -> int | None:
        """The seed whose splits belong with the model in ``folder`` (None: no opinion)."""
        ...


_providers: dict[str, TaskProvider] = {}
_entry_points_loaded = False


def register_task_provider(name: str, provider: TaskProvider, *, replace: bool = False) -> None:
    """Make ``provider``'s tasks available to :func:`get_task`."""
    if name in _providers and not replace and _providers[name] is not provider:
        raise ValueError(f"task provider {name!r} is already registered")
    _providers[name] = provider


def task_providers() -> dict[str, TaskProvider]:
    """Every registered provider by name (entry points loaded on first use)."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for entry in entry_points(group=PROVIDER_GROUP):
            _providers.setdefault(entry.name, entry.load())
    return dict(_providers)


def known_task_names() -> list[str]:
    """The names :func:`get_task` accepts without a prefix (the providers' tasks)."""
    return [name for provider in task_providers().values() for name in provider.names()]


def get_task(name: str, *, seed: int = 0) -> Task:
    """The task called ``name``; an unknown name raises TaskError listing the known ones.

    ``seed`` fixes the splits of provider tasks (the zoo's) and is ignored by the others.
    """
    if name.startswith("lmeval:"):
        from shoal.eval.lmeval_adapter import lmeval_task

        return lmeval_task(name[len("lmeval:"):])
    if name.startswith("jsonl:"):
        from shoal.eval.jsonl_task import JsonlTask

        return JsonlTask(Path(name[len("jsonl:"):]))
    for provider in task_providers().values():
        if name in provider.names():
            return provider.get(name, seed=seed)
    known = known_task_names()
    listed = ", ".join(known) if known else "(no task providers installed)"
    raise TaskError(f"unknown task {name!r}; known tasks: {listed}; "
                    "or use jsonl:<path> or lmeval:<task>")


def task_seed_of_models(folders: Iterable[str | Path]) -> int | None:
    """The seed whose task splits belong with these models, when a provider knows it (the
    models of a zoo world built with seed S: S); None when no provider knows any of them.

    Models that belong with different seeds raise TaskError: no split is held out for all.
    """
    seeds: dict[int, str] = {}
    for folder in folders:
        for provider in task_providers().values():
            seed = provider.seed_of_model(Path(folder))
            if seed is not None:
                seeds.setdefault(seed, str(folder))
                break
    if len(seeds) > 1:
        listed = ", ".join(f"{where} (seed {seed})" for seed, where in sorted(seeds.items()))
        raise TaskError(f"the models come from worlds built with different seeds: {listed}; "
                        "a seed's held-out splits are not held out from another seed's training data, "
                        "so pass task_seed explicitly")
    return next(iter(seeds), None)
