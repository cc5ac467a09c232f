"""Find a task by name.

- ``lmeval:<task>``: an lm-eval-harness task through the adapter (extra ``lmeval``);
- ``jsonl:<path>``: the user's own data, see :mod:`shoal.eval.jsonl_task`;
- anything else: a task of the miniature world (``shoal.zoo.tasks``).
"""

from __future__ import annotations

from pathlib import Path

from shoal.errors import TaskError
from shoal.eval.task import Task


def known_task_names() -> list[str]:
    """The names :func:`get_task` accepts without a prefix (the zoo tasks)."""
    try:
        from shoal.zoo.tasks import ZOO_TASKS
    except ImportError:  # pragma: no cover - the zoo ships with shoal
        return []
    return list(ZOO_TASKS)


def get_task(name: str, *, seed: int = 0) -> Task:
    """The task called ``name``; an unknown name raises TaskError listing the known ones.

    ``seed`` fixes the splits of zoo tasks and is ignored by the others.
    """
    if name.startswith("lmeval:"):
        from shoal.eval.lmeval_adapter import lmeval_task

        return lmeval_task(name[len("lmeval:"):])
    if name.startswith("jsonl:"):
        from shoal.eval.jsonl_task import JsonlTask

        return JsonlTask(Path(name[len("jsonl:"):]))
    known = known_task_names()
    if name in known:
        from shoal.zoo.tasks import get_zoo_task

        return get_zoo_task(name, seed=seed)
    listed = ", ".join(known) if known else "(no zoo tasks available)"
    raise TaskError(f"unknown task {name!r}; known tasks: {listed}; "
                    "or use jsonl:<path> or lmeval:<task>")
