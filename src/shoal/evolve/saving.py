"""What a finished search writes into its run folder: the best recipe or path, the model, and
the model's card (what was searched, how, and the scores)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from shoal.evolve.references import MODEL_DIR
from shoal.merge.recipe import Recipe

BEST_RECIPE = "best_recipe.yaml"
BEST_PATH = "best_path.json"


def save_best_recipe(recipe: Recipe, run_dir: Path, *, write_model: bool, seed: int) -> Path | None:
    """``run_dir/best_recipe.yaml`` and, with ``write_model``, its merge in ``run_dir/model``.

    Sources from the zoo are written as their ``zoo:`` names, not as cache paths."""
    from shoal.evolve.study_attrs import portable_recipe

    recipe = portable_recipe(recipe)
    (run_dir / BEST_RECIPE).write_text(recipe.to_yaml())
    if not write_model:
        return None
    from shoal.merge.execute import merge

    merge(recipe, run_dir / MODEL_DIR, seed=seed, overwrite=True)
    return run_dir / MODEL_DIR


def save_best_path(model: Any, path: Any, sources: Sequence[str], run_dir: Path, *,
                   write_model: bool) -> Path | None:
    """``run_dir/best_path.json`` and, with ``write_model``, the layer-path ``model`` (already
    switched to ``path``) in ``run_dir/model``."""
    from shoal.evolve.study_attrs import portable_reference

    (run_dir / BEST_PATH).write_text(json.dumps({"sources": [portable_reference(str(s)) for s in sources],
                                                 "path": path.to_list()}, indent=2))
    if not write_model:
        return None
    from shoal.flow.build import save_path_model

    save_path_model(model, run_dir / MODEL_DIR, overwrite=True)
    return run_dir / MODEL_DIR


SEARCH_PAPER = "https://arxiv.org/abs/2403.13187"


def search_summary(evaluator: Any, trials: int, validation: float | None) -> list[str]:
    """Markdown bullets: the space, the trial budget, the fitness tasks and split, the pick."""
    config = evaluator.config
    fitness = config.fitness
    limit = f", first {fitness.limit} examples" if fitness.limit else ""
    lines = [f"- space: {evaluator.title}",
             f"- trials: {trials} completed ({config.search.sampler} sampler, seed {config.search.seed})",
             f"- fitness: `{'`, `'.join(fitness.tasks)}` on the `{fitness.split}` split{limit}"]
    if config.validation is not None:
        spec = config.validation
        picked = f" (scored {100 * validation:.1f}%)" if validation is not None else ""
        lines.append(f"- final pick: the best of the top {spec.top_k} fitness trials on "
                     f"`{'`, `'.join(spec.tasks)}`, `{spec.split}` split{picked}")
    else:
        lines.append("- final pick: the best fitness trial")
    return lines


def write_evolved_card(run_dir: Path, evaluator: Any, trials: int, scores: Sequence[Any],
                       validation: float | None, genome: Mapping[str, float] | None = None) -> Path | None:
    """Rewrite ``run_dir/model/README.md`` as the card of an evolved model: the search, its
    scores (the report's table), the method's paper and the search's, the sources (``zoo:``
    names where they came from the zoo) and the recipe or layer path. None without a model."""
    from shoal.checkpoint.model_card import write_model_card
    from shoal.evolve.report import markdown_table
    from shoal.evolve.study_attrs import portable_reference

    model_dir = Path(run_dir) / MODEL_DIR
    if not (model_dir / "config.json").is_file():
        return None
    config = evaluator.config
    split = scores[0].split if scores else config.report.split
    extra = ["## Search", "", *search_summary(evaluator, trials, validation), "",
             f"Search: Akiba et al. 2024, \"Evolutionary Optimization of Model Merging Recipes\", "
             f"{SEARCH_PAPER}.", ""]
    if scores:
        extra += [f"## Scores ({split} split, % correct ± standard error)", "", markdown_table(scores), ""]
    intro = (f"This model was made with shoal by an evolutionary search over "
             f"{'merge recipes' if config.kind != 'dfs' else 'layer paths'} of the models below "
             f"([paper]({SEARCH_PAPER})).")
    if (Path(run_dir) / BEST_RECIPE).is_file():
        from shoal.merge.recipe import load_recipe
        from shoal.merge.registry import get_method

        recipe = load_recipe(Path(run_dir) / BEST_RECIPE)
        sources = list(dict.fromkeys(([recipe.base_model] if recipe.base_model else [])
                                     + [m.model for m in recipe.models or []]))
        write_model_card(model_dir, sources=sources, method=recipe.merge_method, recipe_yaml=recipe.to_yaml(),
                         base_model=recipe.base_model, extra="\n".join(extra), title="Evolved merge",
                         intro=intro, method_paper=get_method(recipe.merge_method).paper)
    else:
        sources = [portable_reference(s) for s in evaluator.sources]
        path_text = (Path(run_dir) / BEST_PATH).read_text(encoding="utf-8")
        write_model_card(model_dir, sources=sources, method="layer path (data-flow space)",
                         recipe_yaml=path_text, extra="\n".join(extra), title="Evolved layer-path model",
                         intro=intro, method_paper=SEARCH_PAPER, recipe_language="json", recipe_file=None)
    return model_dir / "README.md"
