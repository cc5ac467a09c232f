"""The equal-budget uniform search: Optuna over the two genes of a uniform merge.

A uniform merge gives every model the same density and weight
(:func:`shoal.evolve.baselines.uniform_recipe`). This searches those two values with the same
trial budget, the same gene ranges and transform as the per-layer search
(:func:`shoal.evolve.space.to_range`), the same fitness split, and picks the final point the
same way (:func:`shoal.evolve.run.select_final`: the best of the top-k fitness trials on
validation). The study lives in its own folder and resumes like an evolve run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from shoal.errors import ConfigError
from shoal.evolve.config import SearchSpec
from shoal.evolve.space import to_range
from shoal.merge.recipe import Recipe
from shoal.progress import ProgressFn, no_progress

UNIFORM_GENES = ("density", "weight")
SETTINGS_FILE = "uniform_search.json"


@dataclass(frozen=True)
class UniformFound:
    values: dict[str, float]  # the chosen density and weight
    recipe: Recipe
    fitness: float
    validation: float | None
    trials: int


class UniformGenes:
    """The search interface of :mod:`shoal.evolve.run` over two shared genes, scored by a
    parameter-space ``Evaluator`` (its resident model and splits)."""

    def __init__(self, evaluator: Any):
        self.evaluator = evaluator
        self.config = evaluator.config
        ranges: dict[str, tuple[float, float]] = {}
        for gene in evaluator.space.genes:
            if gene.param in UNIFORM_GENES:
                ranges.setdefault(gene.param, (gene.low, gene.high))
        missing = [g for g in UNIFORM_GENES if g not in ranges]
        if missing:
            raise ConfigError(f"the uniform search needs the genes {list(UNIFORM_GENES)}; the space "
                              f"of method {self.config.method!r} lacks {missing}")
        self.ranges = ranges
        self.gene_keys = list(UNIFORM_GENES)

    def values(self, genome: Mapping[str, float]) -> dict[str, float]:
        return {k: to_range(genome[k], *self.ranges[k]) for k in self.gene_keys}

    def recipe(self, genome: Mapping[str, float]) -> Recipe:
        return self.evaluator.uniform_recipe(**self.values(genome))

    def score_genome(self, genome: Mapping[str, float], task: Any, split: str, limit: int | None) -> Any:
        return self.evaluator.score_recipe(self.recipe(genome), task, split, limit)

    def fitness(self, genome: dict[str, float]) -> tuple[float, dict]:
        spec = self.config.fitness
        result = self.score_genome(genome, spec.task, spec.split, spec.limit)
        return result.score, {"n": result.n}


def uniform_search(evaluator: Any, folder: str | Path, *, trials: int, sampler: str = "tpe",
                   seed: int = 0, progress: ProgressFn = no_progress) -> UniformFound:
    """Run (or resume) the uniform search in ``folder`` and pick its point on validation."""
    from shoal.evolve.run import select_final
    from shoal.evolve.search import default_storage, finished_trials, open_study, run_trials

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    genes = UniformGenes(evaluator)
    config = evaluator.config
    settings = {"sampler": sampler, "seed": seed, "ranges": genes.ranges, "method": config.method,
                "models": list(config.models), "fitness": config.fitness.model_dump(mode="json"),
                "validation": config.validation.model_dump(mode="json") if config.validation else None,
                "task_seed": evaluator.task_seed, "merge_seed": config.seed}
    settings = json.loads(json.dumps(settings))  # tuples as lists, as read back
    path = folder / SETTINGS_FILE
    if path.exists():
        saved = {k: v for k, v in json.loads(path.read_text()).items() if k != "trials"}
        if saved != settings:
            changed = sorted(k for k in settings if saved.get(k) != settings[k])
            raise ConfigError(f"{path} holds a different uniform search (in {', '.join(changed)}); "
                              "use a new folder")
    path.write_text(json.dumps({**settings, "trials": trials}, indent=2))
    spec = SearchSpec(sampler=sampler, trials=trials, seed=seed)  # type: ignore[arg-type]
    study = open_study(default_storage(folder), genes.gene_keys, spec, resume=True)
    from shoal.evolve.workers import InProcess

    run_trials(study, genes.gene_keys, InProcess(genes.fitness), trials, progress=progress)
    genome, fitness, validation = select_final(genes, study, progress=progress)
    return UniformFound(values=genes.values(genome), recipe=genes.recipe(genome), fitness=fitness,
                        validation=validation, trials=finished_trials(study))
