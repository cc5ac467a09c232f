"""The score matrix: every model x every task on one split, with example counts.

``shoal zoo card`` prints it for the miniature world; evolution and adaptation reports use it
for their tables of sources and results.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from shoal.eval.evaluate import EvalResult, evaluate
from shoal.eval.loading import load_model
from shoal.eval.registry import get_task
from shoal.eval.task import Task
from shoal.progress import ProgressFn, no_progress


class ModelSet(Protocol):
    """Named models on disk (a :class:`shoal.zoo.ZooWorld` is one)."""

    models: Sequence[str]

    def model(self, name: str) -> Path: ...


@dataclass(frozen=True)
class ScoreMatrix:
    """``results[(model, task)]`` for every model and task, on one split."""

    split: str
    models: tuple[str, ...]
    tasks: tuple[str, ...]
    results: Mapping[tuple[str, str], EvalResult]

    def result(self, model: str, task: str) -> EvalResult:
        return self.results[(model, task)]

    def counts(self) -> dict[str, int]:
        """Examples per task (the same for every model)."""
        return {t: self.results[(self.models[0], t)].n for t in self.tasks} if self.models else {}

    def markdown(self, *, stderr: bool = True) -> str:
        """The matrix as a Markdown table: scores in %, example counts in the header."""
        counts = self.counts()
        header = " | ".join(f"{t} (n={counts.get(t, 0)})" for t in self.tasks)
        lines = [f"| model | {header} |", "|---|" + "---:|" * len(self.tasks)]
        for model in self.models:
            cells = []
            for task in self.tasks:
                r = self.results[(model, task)]
                cells.append(f"{100 * r.score:.1f} ± {100 * r.stderr:.1f}" if stderr
                             else f"{100 * r.score:.1f}")
            lines.append(f"| {model} | {' | '.join(cells)} |")
        return "\n".join(lines)

    def as_records(self) -> list[dict[str, Any]]:
        """One JSON-ready record per cell."""
        return [{"model": m, "task": t, "split": self.split, "score": r.score,
                 "stderr": r.stderr, "n": r.n, "correct": r.correct}
                for (m, t), r in self.results.items()]


def score_matrix(world: ModelSet | Mapping[str, str | Path],
                 tasks: Sequence[str | Task] | None = None, split: str = "test", *,
                 limit: int | None = None, batch_size: int = 64, device: str = "cpu",
                 progress: ProgressFn | None = None) -> ScoreMatrix:
    """Evaluate every model of ``world`` on every task.

    ``world`` is a zoo world (or anything with ``models`` and ``model(name)``) or a mapping
    from model name to folder. ``tasks`` are task names or Task objects; by default the
    world's own tasks. Task names are resolved with the world's ``task(name)`` when it has one
    (so a zoo world's seed applies), else with :func:`shoal.eval.get_task`.
    """
    report = progress or no_progress
    if isinstance(world, Mapping):
        names = tuple(world)
        locate = lambda name: Path(world[name])  # noqa: E731
    else:
        names = tuple(world.models)
        locate = world.model
    if tasks is None:
        tasks = tuple(getattr(world, "tasks", ()))
    resolved = [_resolve(world, t) for t in tasks]
    total = len(names) * len(resolved)
    results: dict[tuple[str, str], EvalResult] = {}
    report("score matrix", 0, total)
    for name in names:
        model, tokenizer = load_model(locate(name), device=device)
        for task in resolved:
            results[(name, task.name)] = evaluate(model, tokenizer, task, split, limit=limit,
                                                  batch_size=batch_size)
            report("score matrix", len(results), total)
        del model
    return ScoreMatrix(split, names, tuple(t.name for t in resolved), results)


def _resolve(world: Any, task: str | Task) -> Task:
    if not isinstance(task, str):
        return task
    if hasattr(world, "task") and callable(world.task) and ":" not in task:
        return world.task(task)
    return get_task(task)
