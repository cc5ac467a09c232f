"""The world's score card: every model x every task on one split (a language world, or a VLM
world: its VLM on the image tasks, where a cell also shows the exact-match rate)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shoal.progress import ProgressFn, no_progress


@dataclass(frozen=True)
class ScoreCell:
    """One model's score on one task: mean score, standard error, example count, and for image
    tasks (scored by ROUGE-L) the share of answers that match word for word."""

    score: float
    stderr: float
    n: int
    exact: float | None = None


@dataclass(frozen=True)
class ScoreCard:
    """``cells[model][task]``, plus the world's split and its models and tasks in order."""

    split: str
    models: tuple[str, ...]
    tasks: tuple[str, ...]
    cells: dict[str, dict[str, ScoreCell]]

    def markdown(self) -> str:
        """The card as a Markdown table (scores in %, example counts in the header)."""
        counts = {t: self.cells[self.models[0]][t].n for t in self.tasks}
        header = " | ".join(f"{t} (n={counts[t]})" for t in self.tasks)
        lines = [f"| model | {header} |", "|---|" + "---:|" * len(self.tasks)]
        for model in self.models:
            row = " | ".join(_cell(self.cells[model][t]) for t in self.tasks)
            lines.append(f"| {model} | {row} |")
        return "\n".join(lines)


def _cell(cell: ScoreCell) -> str:
    text = f"{100 * cell.score:.1f}"
    return text if cell.exact is None else f"{text} (exact {100 * cell.exact:.1f})"


def score_card(world: Any, *, split: str = "test", limit: int | None = None,
               batch_size: int = 128, progress: ProgressFn | None = None) -> ScoreCard:
    """Evaluate every model of ``world`` (a :class:`~shoal.zoo.build.ZooWorld` or a
    :class:`~shoal.zoo.vlm_build.VlmWorld`) on every task of ``world``."""
    from shoal.eval import evaluate, load_model
    from shoal.zoo.vision_tasks import IMAGE_TASKS as image_tasks

    report = progress or no_progress
    total = len(world.models) * len(world.tasks)
    cells: dict[str, dict[str, ScoreCell]] = {}
    done = 0
    report("score card", 0, total)
    for name in world.models:
        model, tokenizer = load_model(world.model(name))
        cells[name] = {}
        for task_name in world.tasks:
            result = evaluate(model, tokenizer, world.task(task_name), split, limit=limit,
                              batch_size=batch_size)
            exact = result.correct / result.n if task_name in image_tasks else None
            cells[name][task_name] = ScoreCell(result.score, result.stderr, result.n, exact)
            done += 1
            report("score card", done, total)
    return ScoreCard(split, world.models, world.tasks, cells)
