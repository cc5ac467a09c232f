"""The world's score card: every model x every task on one split."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.progress import ProgressFn, no_progress
from shoal.zoo.build import ZooWorld


@dataclass(frozen=True)
class ScoreCell:
    """One model's score on one task: mean score, standard error, example count."""

    score: float
    stderr: float
    n: int


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
            row = " | ".join(f"{100 * self.cells[model][t].score:.1f}" for t in self.tasks)
            lines.append(f"| {model} | {row} |")
        return "\n".join(lines)


def score_card(world: ZooWorld, *, split: str = "test", limit: int | None = None,
               batch_size: int = 128, progress: ProgressFn | None = None) -> ScoreCard:
    """Evaluate every model of ``world`` on every task of ``world``."""
    from shoal.eval import evaluate, load_model

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
            cells[name][task_name] = ScoreCell(result.score, result.stderr, result.n)
            done += 1
            report("score card", done, total)
    return ScoreCard(split, world.models, world.tasks, cells)
