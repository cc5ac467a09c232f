"""Plan a merge of diffusion pipelines: component by component, the UNet block by block.

Every tensor is named ``COMPONENT/NAME`` (:mod:`shoal.checkpoint.diffusion`). A component either
merges (its tensors go through the recipe's method, parameters resolved per tensor as for any
model) or is copied from the reference model (the base, else the first model) exactly as stored.
By default the UNet and the text encoders merge and everything else (the VAE, a safety checker, a
single file's ``other`` tensors) is copied; the recipe's ``components`` overrides that per
component, and a component the reference lacks is an error naming it.

Gradients run over the UNet's blocks (``IN00 .. M00 .. OUT..``, :mod:`shoal.checkpoint.unet`): a
list of as many values as blocks gives each block its own; a text encoder's gradient runs over its
layers; tensors in no block or layer take the first value. A filter written as a block name
(``filter: IN04``) applies to that block's tensors.
"""

from __future__ import annotations

import re
from typing import Mapping

from shoal.checkpoint.diffusion import FOLDER, DiffusionCheckpoint, component_of, is_diffusion
from shoal.checkpoint.dtypes import is_floating
from shoal.checkpoint.unet import unet_block_map, unet_blocks
from shoal.errors import RecipeError
from shoal.merge.model_view import ModelView
from shoal.merge.params import TensorPosition
from shoal.merge.plan import (MergePlan, SourceRef, TensorOp, merge_op, prefix_maps, source_name, tensor_seed,
                              tokenizer_source)
from shoal.merge.plan_params import check_model_count, resolve_params
from shoal.merge.recipe import Recipe
from shoal.merge.registry import MethodSpec

MERGE, COPY_COMPONENT = "merge", "copy"
DEFAULT_MERGED = ("unet", "text_encoder", "text_encoder_2")
LAYOUT_FOLDER, LAYOUT_SINGLE_FILE = "diffusers", "single_file"
_TEXT_LAYER = re.compile(r"(?:^|\.)(?:layers|resblocks)\.(\d+)\.")


def component_modes(recipe: Recipe, reference: DiffusionCheckpoint) -> dict[str, str]:
    """``merge`` or ``copy`` for every weight component of the reference model."""
    present = list(reference.components)
    for name in recipe.components:
        if name not in reference.components:
            raise RecipeError(f"components: unknown component {name!r}: {reference.source} has "
                              f"{', '.join(present)}")
    return {name: recipe.components.get(name, MERGE if name in DEFAULT_MERGED else COPY_COMPONENT)
            for name in present}


def check_diffusion_sources(recipe: Recipe, readers: Mapping[str, object]) -> None:
    """Every model a diffusion recipe names is a pipeline, all of one form (folders, or single files)."""
    if recipe.slices is not None:
        raise RecipeError("slices: diffusion pipelines merge with 'models' (layer ranges do not apply; "
                          "use gradients or block filters such as 'filter: IN04')")
    if recipe.chat_template is not None:
        raise RecipeError("chat_template: applies to language models, not to diffusion pipelines")
    kinds = {}
    for name in recipe.source_models():
        reader = readers[name]
        if not is_diffusion(reader):
            raise RecipeError(f"model {name!r} is not a diffusion pipeline (no model_index.json, not a "
                              "single-file Stable Diffusion checkpoint), but other models of the recipe are")
        kinds[name] = reader.kind  # type: ignore[attr-defined]
    if len(set(kinds.values())) > 1:
        folders = [n for n, k in kinds.items() if k == FOLDER]
        files = [n for n, k in kinds.items() if k != FOLDER]
        raise RecipeError(f"models: {folders[0]} is a diffusers folder but {files[0]} is a single file; their "
                          "tensors are named differently: merge folders with folders, single files with single files")


def _positions(names: list[str]) -> dict[str, TensorPosition]:
    """Where each tensor sits for gradients: UNet blocks, text-encoder layers."""
    blocks = unet_block_map(names)
    order = {block: i for i, block in enumerate(unet_blocks(names))}
    layers: dict[str, int] = {}
    count: dict[str, int] = {}
    for name in names:
        component, inner = component_of(name)
        match = _TEXT_LAYER.search(inner)
        if component.startswith("text_encoder") and match:
            layers[name] = int(match.group(1))
            count[component] = max(count.get(component, 0), layers[name] + 1)
    positions = {}
    for name in names:
        component = component_of(name)[0]
        if name in blocks:
            positions[name] = TensorPosition(name, order[blocks[name]], len(order), blocks[name])
        else:
            positions[name] = TensorPosition(name, layers.get(name), count.get(component, 0))
    return positions


def plan_diffusion(recipe: Recipe, method: MethodSpec, readers: Mapping[str, DiffusionCheckpoint],
                   seed: int) -> MergePlan:
    """The plan of a ``models`` recipe over diffusion pipelines (see the module docstring)."""
    assert recipe.models is not None
    maps = prefix_maps(recipe)
    views = {key: ModelView(key, readers[key], maps.get(key, {})) for key in recipe.source_models()}  # type: ignore[arg-type]
    base_key = recipe.base_model
    entries = [m for m in recipe.models if not (method.uses_base(base_key) and m.model == base_key)]
    check_model_count(method, len(entries), "models")
    reference = base_key if base_key is not None else recipe.models[0].model
    ref_reader = readers[reference]
    modes = component_modes(recipe, ref_reader)
    for entry in entries:  # a merged component every model must have (a UNet-only file lacks the text encoder)
        missing = [c for c, mode in modes.items() if mode == MERGE and c not in readers[entry.model].components]
        if missing:
            raise RecipeError(f"model {entry.model!r} has no component {missing[0]!r}; copy it from the reference "
                              f"with 'components: {{{missing[0]}: copy}}'")
    ref_view = views[reference]
    positions = _positions(list(ref_view.to_source))
    ops: list[TensorOp] = []
    for out_name in ref_view.to_source:
        stored = source_name(ref_view, out_name)
        if modes[component_of(out_name)[0]] == COPY_COMPONENT or not is_floating(ref_reader.dtype_name(stored)):
            # as stored: a copied component is bitwise the reference's (no dtype change either)
            ops.append(TensorOp(name=out_name, method="copy", base=None, models=(SourceRef(reference, stored),),
                                params=(), shape=tuple(ref_reader.shape(stored)), out_dtype=ref_reader.dtype_name(stored),
                                seed=tensor_seed(seed, out_name)))
            continue
        base = (ref_view, stored) if method.uses_base(base_key) else None
        refs = [(views[e.model], source_name(views[e.model], out_name)) for e in entries]
        params = resolve_params(method, positions[out_name], [e.parameters for e in entries], [recipe.parameters],
                                recipe.compat)
        ops.append(merge_op(out_name, method, recipe, base, refs, params, seed))
    layout = LAYOUT_FOLDER if ref_reader.kind == FOLDER else LAYOUT_SINGLE_FILE
    return MergePlan(recipe=recipe, method=method.name, ops=tuple(ops), reference=reference,
                     tokenizer_source=tokenizer_source(recipe, reference), output_layout=layout,
                     components=tuple(modes.items()))
