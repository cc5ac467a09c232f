"""What a merged folder holds besides the weights: config, tokenizer, generation config, recipe, model card."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping

from shoal.checkpoint import CheckpointReader, copy_support_files, write_model_card
from shoal.errors import MergeError
from shoal.merge.plan import COPY, MergePlan
from shoal.merge.registry import get_method


def write_support(plan: MergePlan, readers: Mapping[str, CheckpointReader], stage: Path, *,
                  seed: int) -> None:
    """Config, tokenizer, generation config, the recipe and the model card."""
    copy_support_files(readers[plan.reference], stage, config_updates=dict(plan.config_updates))
    if plan.tokenizer_source != plan.reference:
        _copy_tokenizer(readers[plan.tokenizer_source], stage)
    recipe = plan.recipe
    if recipe.seed is None and _uses_randomness(plan):
        recipe = recipe.model_copy(update={"seed": seed})
    recipe_yaml = recipe.to_yaml()
    write_model_card(stage, sources=plan.models_used(), method=plan.method, recipe_yaml=recipe_yaml,
                     base_model=recipe.base_model)


def _copy_tokenizer(source: CheckpointReader, stage: Path) -> None:
    """Replace the tokenizer files in ``stage`` by those of ``source`` (``tokenizer_source``)."""
    from shoal.checkpoint.support_files import SUPPORT_FILES

    folder = source.path if Path(source.path).is_dir() else Path(source.path).parent
    names = [n for n in SUPPORT_FILES if n != "generation_config.json"]
    if not any((folder / n).is_file() for n in names):
        raise MergeError(f"tokenizer_source {source.source}: no tokenizer files in {folder}")
    for name in names:
        if (stage / name).exists():
            (stage / name).unlink()
        if (folder / name).is_file():
            shutil.copyfile(folder / name, stage / name)


def _uses_randomness(plan: MergePlan) -> bool:
    return plan.method != COPY and get_method(plan.method).uses_generator


