"""What a finished search writes into its run folder: the best recipe or path, and the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from shoal.evolve.references import MODEL_DIR
from shoal.merge.recipe import Recipe

BEST_RECIPE = "best_recipe.yaml"
BEST_PATH = "best_path.json"


def save_best_recipe(recipe: Recipe, run_dir: Path, *, write_model: bool, seed: int) -> Path | None:
    """``run_dir/best_recipe.yaml`` and, with ``write_model``, its merge in ``run_dir/model``."""
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
    (run_dir / BEST_PATH).write_text(json.dumps({"sources": list(sources), "path": path.to_list()},
                                                indent=2))
    if not write_model:
        return None
    from shoal.flow.build import save_path_model

    save_path_model(model, run_dir / MODEL_DIR, overwrite=True)
    return run_dir / MODEL_DIR
