"""What a search scores: a resident model that each genome is written into.

- :class:`Evaluator` (parameter space): a genome decodes to a merge recipe, merged in memory
  into one resident model of the reference architecture.
- :class:`DfsEvaluator` (data-flow space): a genome decodes to a layer path; one resident
  layer-path model holds every layer of every source and only switches its path.

Both expose the same small interface the search loop and the run use: ``gene_keys``, ``x0``,
``fitness``, ``score_genome``, ``save_best``, ``rows``, ``plot_best``, ``describe``, ``close``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from shoal.evolve.candidate import CandidateBuilder
from shoal.evolve.config import EvolveConfig
from shoal.evolve.space import SearchSpace, build_space
from shoal.merge.recipe import ModelEntry, Recipe

BEST_RECIPE = "best_recipe.yaml"
BEST_PATH = "best_path.json"
MODEL_DIR = "model"  # the final merged model inside a run folder


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    from shoal.eval.loading import prepare_tokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(folder))


def _folder(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_dir() else path.parent


def score_model(model: Any, tokenizer: Any, task: str | list[str], split: str, limit: int | None,
                batch_size: int) -> Any:
    """Score a model on one task, or on several (the mean, with the total example count)."""
    from shoal.eval import get_task
    from shoal.eval.evaluate import evaluate, result_from_scores

    names = [task] if isinstance(task, str) else list(task)
    with torch.inference_mode():
        results = [evaluate(model, tokenizer, get_task(name), split, limit=limit, batch_size=batch_size)
                   for name in names]
    if len(results) == 1:
        return results[0]
    mean = sum(r.score for r in results) / len(results)
    return replace(result_from_scores("+".join(names), split, (), [mean]), n=sum(r.n for r in results))


class _Base:
    config: EvolveConfig
    model: Any
    tokenizer: Any

    @property
    def gene_keys(self) -> list[str]:
        raise NotImplementedError

    x0: dict[str, float] | None = None

    def load(self, genome: Mapping[str, float]) -> None:
        """Make the resident model the candidate of ``genome``."""
        raise NotImplementedError

    def score_genome(self, genome: Mapping[str, float], task: str | list[str], split: str,
                     limit: int | None) -> Any:
        self.load(genome)
        return score_model(self.model, self.tokenizer, task, split, limit, self.config.batch_size)

    def fitness(self, genome: dict[str, float]) -> tuple[float, dict]:
        spec = self.config.fitness
        result = self.score_genome(genome, spec.task, spec.split, spec.limit)
        return result.score, {"n": result.n}

    def score_row(self, row: Any, task: str, split: str, limit: int | None) -> Any:
        """Score a report row: a genome (dict), or a model folder (str)."""
        if isinstance(row, str):
            from shoal.eval import load_model

            model, tokenizer = load_model(row, device=self.config.device)
            return score_model(model, tokenizer, task, split, limit, self.config.batch_size)
        return self.score_genome(row, task, split, limit)


class Evaluator(_Base):
    """Parameter space: candidates merged in memory into one resident model."""

    def __init__(self, config: EvolveConfig):
        self.config = config
        models = ([config.base_model] if config.base_model else []) + list(config.models)
        self.builder = CandidateBuilder(models, device=config.device)
        self.reference = config.base_model or config.models[0]
        reader = self.builder.readers[self.reference]
        arch = ((reader.config or {}).get("architectures") or [None])[0]
        self.space: SearchSpace = build_space(config, reader.tensor_names(), arch)
        self.model = self.builder.load_model(self.reference)
        self.tokenizer = _tokenizer(_folder(reader.path))

    @property
    def gene_keys(self) -> list[str]:
        return [g.key for g in self.space.genes]

    def close(self) -> None:
        self.builder.close()

    def load(self, genome: Mapping[str, float]) -> None:
        self.apply(self.space.decode(genome))

    def apply(self, recipe: Recipe) -> None:
        self.builder.apply(self.model, recipe, seed=self.config.seed)

    def score_recipe(self, recipe: Recipe, task: str | list[str], split: str, limit: int | None) -> Any:
        """Merge ``recipe`` into the resident model and score it."""
        self.apply(recipe)
        return score_model(self.model, self.tokenizer, task, split, limit, self.config.batch_size)

    def score_row(self, row: Any, task: str, split: str, limit: int | None) -> Any:
        if isinstance(row, Recipe):
            return self.score_recipe(row, task, split, limit)
        return super().score_row(row, task, split, limit)

    def describe(self, genome: Mapping[str, float]) -> str:
        return self.space.decode(genome).to_yaml()

    def save_best(self, genome: Mapping[str, float], run_dir: Path, *, write_model: bool) -> Path | None:
        from shoal.merge.execute import merge

        best = self.space.decode(genome)
        (run_dir / BEST_RECIPE).write_text(best.to_yaml())
        if not write_model:
            return None
        merge(best, run_dir / MODEL_DIR, seed=self.config.seed, overwrite=True)
        return run_dir / MODEL_DIR

    def uniform_recipe(self, **values: float) -> Recipe:
        """The method with every model at the same parameter values (a baseline)."""
        config = self.config
        entries = [ModelEntry(model=m, parameters=dict(values)) for m in config.models  # type: ignore[arg-type]
                   if not (config.base_model and m == config.base_model)]
        return Recipe(merge_method=config.method, base_model=config.base_model, models=entries,
                      parameters=dict(config.fixed), seed=config.seed)  # type: ignore[arg-type]

    def rows(self, genome: Mapping[str, float], baseline: Mapping[str, float] | None) -> list[tuple[str, Any]]:
        sources = ([self.config.base_model] if self.config.base_model else []) + list(self.config.models)
        rows: list[tuple[str, Any]] = list(zip(source_labels(sources), sources))
        rows.append((f"uniform {self.config.method}", self.uniform_recipe(**(baseline or {}))))
        return rows

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
        spec = config.dfs
        self.sources = list(config.models)
        layout = DfsLayout(layer_counts=tuple(source_layer_counts(self.sources)), repeats=spec.repeats,
                           max_hops=spec.max_hops, scaling=spec.scaling,
                           scale_range=tuple(spec.scale_range))  # type: ignore[arg-type]
        self.space = DfsSpace(layout)
        self.model = build_path_model(self.sources, self.space.decode(self.space.default_genome()),
                                      keep="all", device=config.device)
        self.tokenizer = _tokenizer(_folder(self.sources[0]))

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
        from shoal.flow.build import save_path_model

        path = self.space.decode(genome)
        (run_dir / BEST_PATH).write_text(json.dumps({"sources": self.sources, "path": path.to_list()},
                                                    indent=2))
        if not write_model:
            return None
        self.load(genome)
        save_path_model(self.model, run_dir / MODEL_DIR, overwrite=True)
        return run_dir / MODEL_DIR

    def rows(self, genome: Mapping[str, float], baseline: Mapping[str, float] | None) -> list[tuple[str, Any]]:
        return list(zip(source_labels(self.sources), self.sources))

    def final_row(self, genome: Mapping[str, float]) -> Any:
        return dict(genome)

    def plot_best(self, genome: Mapping[str, float], path: Path) -> None:
        from shoal.evolve.report import plot_path

        plot_path(self.space.decode(genome), source_labels(self.sources), path)

    @property
    def title(self) -> str:
        return f"data-flow space, {self.space.size} genes, {self.space.num_slots} slots"


def source_labels(sources: Sequence[str]) -> list[str]:
    """Short, distinct names for the report's rows: a folder's name; a finished run's model
    (``RUN/model``) by its run's name; a name that repeats gets its parent folder's name too."""
    def label(ref: str) -> str:
        path = Path(ref)
        if path.name == MODEL_DIR and path.parent.name:
            return f"{path.parent.name} (run)"
        return path.name or ref

    labels = [label(s) for s in sources]
    repeated = {name for name in labels if labels.count(name) > 1}
    return [f"{Path(ref).parent.name}/{name}" if name in repeated and Path(ref).parent.name else name
            for ref, name in zip(sources, labels)]


def make_evaluator(config: EvolveConfig) -> Evaluator | DfsEvaluator:
    return DfsEvaluator(config) if config.kind == "dfs" else Evaluator(config)


def rows_for(evaluator: Any, genome: Mapping[str, float], baseline: Mapping[str, float] | None,
             extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [*evaluator.rows(genome, baseline), *extra, ("evolved", evaluator.final_row(genome))]
