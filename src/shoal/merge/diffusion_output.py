"""Write a merged diffusion pipeline: a diffusers folder, or one single-file checkpoint.

- **diffusers folder** (the sources are pipeline folders): one folder per weight component with
  the reference's ``config.json`` (and its other non-weight files) and the merged weights as
  ``diffusion_pytorch_model.safetensors`` (diffusers components) or ``model.safetensors``
  (transformers components), sharded with an index above the shard size; ``model_index.json``
  and the support folders (``tokenizer/``, ``scheduler/``, ...) copied from the reference, the
  tokenizer folders from ``tokenizer_source`` when the recipe names another model.
  ``diffusers.DiffusionPipeline.from_pretrained`` loads it.
- **single file** (the sources are single-file checkpoints): ``model.safetensors`` in the output
  folder, never sharded, every tensor under the name it had in the reference's file
  (``model.diffusion_model.*``, ...). ``StableDiffusionPipeline.from_single_file`` loads it
  (offline with ``config=`` a local diffusers folder of the same architecture and
  ``local_files_only=True``).

Both are written inside the merge's staging folder, so nothing half-written is ever in place.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

from shoal.checkpoint.diffusion import MODEL_INDEX, DiffusionCheckpoint, component_of, is_weight_file, listed_folders
from shoal.errors import MergeError
from shoal.merge.plan import MergePlan
from shoal.merge.plan_diffusion import LAYOUT_SINGLE_FILE
from shoal.progress import ProgressFn, no_progress

if TYPE_CHECKING:
    from shoal.merge.execute import ExecutorOptions

SINGLE_FILE_PREFIX = "model"  # OUT/model.safetensors
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")


def write_pipeline_tensors(plan: MergePlan, readers: Mapping[str, DiffusionCheckpoint], stage: Path, *,
                           shard_size: int, device: str | torch.device = "cpu", progress: ProgressFn = no_progress,
                           options: ExecutorOptions | None = None) -> int:
    """The merged tensors of ``plan`` into ``stage``, laid out as ``plan.output_layout`` says; returns bytes."""
    from shoal.merge.execute import ExecutorOptions, write_tensor_ops

    options = options if options is not None else ExecutorOptions()
    reference = readers[plan.reference]
    if plan.output_layout == LAYOUT_SINGLE_FILE:
        ops = [replace(op, name=reference.stored_name(op.name)) for op in plan.ops]
        return write_tensor_ops(ops, readers, stage, compat=plan.recipe.compat, shard_size=1 << 62,  # type: ignore[arg-type]
                                device=device, progress=progress, options=options, filename_prefix=SINGLE_FILE_PREFIX)
    by_component: dict[str, list] = {}
    for op in plan.ops:
        component, inner = component_of(op.name)
        by_component.setdefault(component, []).append(replace(op, name=inner))
    total = len(plan.ops)
    done_before = 0
    written = 0
    for component, ops in by_component.items():
        library = reference.components[component].library
        prefix = "model" if library == "transformers" else "diffusion_pytorch_model"

        def offset(stage_name: str, done: int, _total: int, _before: int = done_before) -> None:
            progress(stage_name, _before + done, total)

        written += write_tensor_ops(ops, readers, stage / component, compat=plan.recipe.compat,  # type: ignore[arg-type]
                                    shard_size=shard_size, device=device, progress=offset, options=options,
                                    filename_prefix=prefix)
        done_before += len(ops)
    return written


def write_pipeline_support(plan: MergePlan, readers: Mapping[str, DiffusionCheckpoint], stage: Path) -> None:
    """Everything of a merged pipeline folder but the weights (nothing for a single file)."""
    if plan.output_layout == LAYOUT_SINGLE_FILE:
        return
    reference = readers[plan.reference]
    folder = Path(reference.path)
    shutil.copyfile(folder / MODEL_INDEX, stage / MODEL_INDEX)
    for name in listed_folders(reference.config or {}):
        source = folder / name
        if name in reference.components:  # config.json and the other non-weight files; the weights are merged
            (stage / name).mkdir(parents=True, exist_ok=True)  # the tensors may not have made it yet
            for item in sorted(source.iterdir()):
                if item.is_file() and not is_weight_file(item.name):
                    shutil.copyfile(item, stage / name / item.name)
        elif source.is_dir():  # tokenizer, scheduler, feature extractor
            shutil.copytree(source, stage / name)
    if plan.tokenizer_source != plan.reference:
        _copy_tokenizers(readers[plan.tokenizer_source], stage)


def _copy_tokenizers(source: DiffusionCheckpoint, stage: Path) -> None:
    folder = Path(source.path)
    found = [name for name in TOKENIZER_FOLDERS if (folder / name).is_dir()]
    if not found:
        raise MergeError(f"tokenizer_source {source.source}: no tokenizer/ folder in {folder}")
    for name in TOKENIZER_FOLDERS:
        if (stage / name).exists():
            shutil.rmtree(stage / name)
        if (folder / name).is_dir():
            shutil.copytree(folder / name, stage / name)
