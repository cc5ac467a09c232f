"""What a search scores: a resident model that each genome is written into.

- :class:`Evaluator` (parameter space): a genome decodes (:mod:`shoal.evolve.space`) to a merge
  recipe, merged in memory (:mod:`shoal.evolve.candidate`) into one resident model of the
  reference architecture.
- :class:`DfsEvaluator` (data-flow space): a genome decodes (:mod:`shoal.flow.genome`) to a
  layer path; one resident layer-path model (:mod:`shoal.flow.build`) holds every layer of
  every source and only switches its path.

Scoring lives in :mod:`shoal.evolve.scoring`, the report's comparison rows in
:mod:`shoal.evolve.baselines`, what a run writes in :mod:`shoal.evolve.saving` and the plots
in :mod:`shoal.evolve.report`. Both evaluators expose the small interface the search loop and
the run use: ``gene_keys``, ``x0``, ``fitness``, ``score_genome``, ``score_row``, ``save_best``,
``rows``, ``final_row``, ``plot_best``, ``describe``, ``title``, ``close``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from shoal.eval.loading import load_model, load_processor
from shoal.evolve.baselines import output_model, source_labels, source_rows, uniform_recipe
from shoal.evolve.candidate import CandidateBuilder
from shoal.evolve.config import EvolveConfig
from shoal.evolve.references import MODEL_DIR
from shoal.evolve.saving import BEST_PATH, BEST_RECIPE, save_best_path, save_best_recipe
from shoal.evolve.scoring import run_task_seed, score_model
from shoal.evolve.space import SearchSpace, build_space
from shoal.evolve.study_attrs import local_recipe, trial_attrs
from shoal.merge.recipe import Recipe

__all__ = ["BEST_PATH", "BEST_RECIPE", "DfsEvaluator", "Evaluator", "MODEL_DIR", "make_evaluator",
           "rows_for", "score_model", "source_labels"]


class _Base:
    config: EvolveConfig
    model: Any
    tokenizer: Any
    task_seed: int

    x0: dict[str, float] | None = None

    @property
    def gene_keys(self) -> list[str]:
        raise NotImplementedError

    def load(self, genome: Mapping[str, float]) -> None:
        """Make the resident model the candidate of ``genome``."""
        raise NotImplementedError

    def score(self, model: Any, tokenizer: Any, task: str | list[str], split: str, limit: int | None) -> Any:
        return score_model(model, tokenizer, task, split, limit, self.config.batch_size, seed=self.task_seed)

    def score_genome(self, genome: Mapping[str, float], task: str | list[str], split: str,
                     limit: int | None) -> Any:
        self.load(genome)
        return self.score(self.model, self.tokenizer, task, split, limit)

    def fitness(self, genome: dict[str, float]) -> tuple[float, dict]:
        spec = self.config.fitness
        result = self.score_genome(genome, spec.task, spec.split, spec.limit)
        return result.score, {"n": result.n, **trial_attrs(self, genome)}

    def score_row(self, row: Any, task: str, split: str, limit: int | None) -> Any:
        """Score a report row: a genome (dict), or a model folder (str)."""
        if isinstance(row, str):
            model, tokenizer = load_model(row, device=self.config.device)
            return self.score(model, tokenizer, task, split, limit)
        return self.score_genome(row, task, split, limit)


class Evaluator(_Base):
    """Parameter space: candidates merged in memory into one resident model."""

    def __init__(self, config: EvolveConfig):
        self.config = config
        self.task_seed = run_task_seed(config)
        models = ([config.base_model] if config.base_model else []) + list(config.models)
        self.builder = CandidateBuilder(models, device=config.device)
        self.reference = output_model(config)
        reader = self.builder.readers[self.reference]
        arch = ((reader.config or {}).get("architectures") or [None])[0]
        self.space: SearchSpace = build_space(config, reader.tensor_names(), arch)
        self.model = self.builder.load_model(self.reference)
        path = Path(reader.path)
        self.tokenizer = load_processor(path if path.is_dir() else path.parent)

    @property
    def gene_keys(self) -> list[str]:
        return [g.key for g in self.space.genes]

    def close(self) -> None:
        self.builder.close()

    def load(self, genome: Mapping[str, float]) -> None:
        self.apply(self.space.decode(genome))

    def apply(self, recipe: Recipe) -> None:
        self.builder.apply(self.model, local_recipe(recipe), seed=self.config.seed)

    def score_recipe(self, recipe: Recipe, task: str | list[str], split: str, limit: int | None) -> Any:
        """Merge ``recipe`` into the resident model and score it."""
        self.apply(recipe)
        return self.score(self.model, self.tokenizer, task, split, limit)

    def score_row(self, row: Any, task: str, split: str, limit: int | None) -> Any:
        if isinstance(row, Recipe):
            return self.score_recipe(row, task, split, limit)
        return super().score_row(row, task, split, limit)

    def describe(self, genome: Mapping[str, float]) -> str:
        return self.space.decode(genome).to_yaml()

    def save_best(self, genome: Mapping[str, float], run_dir: Path, *, write_model: bool) -> Path | None:
        return save_best_recipe(self.space.decode(genome), run_dir, write_model=write_model,
                                seed=self.config.seed)

    def uniform_recipe(self, **values: float) -> Recipe:
        """The method with every model at the same parameter values (see
        :mod:`shoal.evolve.baselines`; no values: the uniform baseline)."""
        return uniform_recipe(self.config, values or None)

    def rows(self, genome: Mapping[str, float], baseline: Mapping[str, float] | None) -> list[tuple[str, Any]]:
        sources = ([self.config.base_model] if self.config.base_model else []) + list(self.config.models)
        return [*source_rows(sources),
                (f"uniform {self.config.method}", uniform_recipe(self.config, baseline))]

    def final_row(self, genome: Mapping[str, float]) -> Any:
        return self.space.decode(genome)

    def plot_best(self, genome: Mapping[str, float], path: Path) -> None:
        from shoal.evolve.report import plot_genome

        plot_genome(self.space, genome, path)

    @property
    def title(self) -> str:
        return f"parameter space, {self.space.method.name}, {len(self.space.genes)} genes"


class DfsEvaluator(_Base):
    """Data-flow space: one resident layer-path model over every layer of every source."""

    def __init__(self, config: EvolveConfig):
        from shoal.flow.build import build_path_model, source_layer_counts
        from shoal.flow.genome import DfsLayout, DfsSpace

        self.config = config
        self.task_seed = run_task_seed(config)
        spec = config.dfs
        self.sources = list(config.models)
        layout = DfsLayout(layer_counts=tuple(source_layer_counts(self.sources)), repeats=spec.repeats,
                           max_hops=spec.max_hops, scaling=spec.scaling,
                           scale_range=tuple(spec.scale_range))  # type: ignore[arg-type]
        self.space = DfsSpace(layout)
        self.model = build_path_model(self.sources, self.space.decode(self.space.default_genome()),
                                      keep="all", device=config.device)
        first = Path(self.sources[0])
        self.tokenizer = load_processor(first if first.is_dir() else first.parent)

    @property
    def gene_keys(self) -> list[str]:
        return list(self.space.keys)

    @property
    def x0(self) -> dict[str, float]:  # type: ignore[override]
        return self.space.default_genome()

    def close(self) -> None:
        self.model = None

    def load(self, genome: Mapping[str, float]) -> None:
        self.model.set_path(self.space.decode(genome))

    def describe(self, genome: Mapping[str, float]) -> str:
        return self.space.decode(genome).describe([Path(s).name for s in self.sources])

    def save_best(self, genome: Mapping[str, float], run_dir: Path, *, write_model: bool) -> Path | None:
        if write_model:
            self.load(genome)
        return save_best_path(self.model, self.space.decode(genome), self.sources, run_dir,
                              write_model=write_model)

    def rows(self, genome: Mapping[str, float], baseline: Mapping[str, float] | None) -> list[tuple[str, Any]]:
        return source_rows(self.sources)

    def final_row(self, genome: Mapping[str, float]) -> Any:
        return dict(genome)

    def plot_best(self, genome: Mapping[str, float], path: Path) -> None:
        from shoal.evolve.report import plot_path

        plot_path(self.space.decode(genome), source_labels(self.sources), path)

    @property
    def title(self) -> str:
        return f"data-flow space, {self.space.size} genes, {self.space.num_slots} slots"


def make_evaluator(config: EvolveConfig) -> Evaluator | DfsEvaluator:
    return DfsEvaluator(config) if config.kind == "dfs" else Evaluator(config)


def rows_for(evaluator: Any, genome: Mapping[str, float], baseline: Mapping[str, float] | None,
             extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [*evaluator.rows(genome, baseline), *extra, ("evolved", evaluator.final_row(genome))]
