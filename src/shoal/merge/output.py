"""What a merged folder holds besides the weights: config, tokenizer, generation config, recipe, model card."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping

from shoal.checkpoint import CheckpointReader, copy_support_files, write_model_card
from shoal.checkpoint.chat_templates import resolve_chat_template, write_chat_template
from shoal.errors import MergeError
from shoal.merge.plan import COPY, MergePlan
from shoal.merge.plan_modes import mode_lines
from shoal.merge.registry import get_method


def write_support(plan: MergePlan, readers: Mapping[str, CheckpointReader], stage: Path, *,
                  seed: int) -> None:
    """Config, tokenizer, generation config, the recipe and the model card."""
    if plan.output_layout != "hf":  # a diffusion pipeline: model_index.json, component configs, support folders
        from shoal.merge.diffusion_output import write_pipeline_support

        write_pipeline_support(plan, readers, stage)
        _write_card(plan, readers, stage, seed=seed)
        return
    copy_support_files(readers[plan.reference], stage, config_updates=dict(plan.config_updates))
    if plan.vocabulary is not None:  # the tokenizer built for the output vocabulary, saved as mergekit saves it
        plan.vocabulary.save(stage)
    elif plan.tokenizer_source != plan.reference:
        _copy_tokenizer(readers[plan.tokenizer_source], stage)
    recipe = plan.recipe
    if recipe.chat_template:
        folders = [_folder(readers[name]) for name in recipe.source_models()]
        template = resolve_chat_template(recipe.chat_template, folders)
        if template is not None:
            write_chat_template(stage, template)
    _write_card(plan, readers, stage, seed=seed)


def _write_card(plan: MergePlan, readers: Mapping[str, CheckpointReader], stage: Path, *, seed: int) -> None:
    recipe = plan.recipe
    if recipe.seed is None and _uses_randomness(plan):
        recipe = recipe.model_copy(update={"seed": seed})
    method = get_method(plan.method)
    # the saved recipe names its mode, so that it reruns in the same one whatever the default
    recipe_yaml = recipe.to_yaml(keep=("compat",) if method.has_compat else ())
    write_model_card(stage, sources=plan.models_used(), method=plan.method, recipe_yaml=recipe_yaml,
                     base_model=recipe.base_model, method_paper=method.paper,
                     details=mode_lines(plan.recipe, method))


def _folder(reader: CheckpointReader) -> Path:
    path = Path(reader.path)
    return path if path.is_dir() else path.parent


def _copy_tokenizer(source: CheckpointReader, stage: Path) -> None:
    """Replace the tokenizer files in ``stage`` by those of ``source`` (``tokenizer_source``)."""
    from shoal.checkpoint.support_files import SUPPORT_FILES

    folder = _folder(source)
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


