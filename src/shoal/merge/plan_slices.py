"""Plan a ``slices`` recipe: layer stacking and per-slice merges, as mergekit plans them.

Each output slice merges its sources layer by layer (a gradient runs over the slice's
layers; a one-layer slice takes its last anchor). The tensors outside the layers come from
the slices at the ends of the stack, at t = 0 of the gradient: what comes before the layers
(the embeddings) is merged across the *first* slice's sources, what comes after (the final
norm, ``lm_head``) across the *last* slice's, so a frankenmerge ends with the head of the
model its last layers come from. A slice may name its own ``base_model``.

One shoal reading differs: a ``base_model`` given to a method that takes none (``passthrough``)
names the model the tensors outside the layers are copied from (a layer-path export writes its
recipe so); mergekit ignores it there, and planning warns.
"""

from __future__ import annotations

from typing import Any, Mapping

from shoal.checkpoint import CheckpointReader, describe_tensor, num_layers, with_layer
from shoal.errors import RecipeError
from shoal.merge.model_view import ModelView
from shoal.merge.model_view import count_layers
from shoal.merge.params import TensorPosition
from shoal.merge.plan import (MergePlan, TensorOp, config_updates, copy_op, merge_op, prefix_maps, source_name,
                              tokenizer_source)
from shoal.merge.plan_params import check_model_count, resolve_params
from shoal.merge.recipe import Recipe, Slice, SliceSource
from shoal.merge.registry import MethodSpec


def _split(sl: Slice, index: int, method: MethodSpec, recipe: Recipe) -> tuple[SliceSource | None, list[SliceSource]]:
    """The slice's base source (when the method needs one) and its other sources."""
    base_model = sl.base_model or recipe.base_model
    if not method.uses_base(base_model):
        return None, list(sl.sources)
    base = next((s for s in sl.sources if s.model == base_model), None)
    if base is None:
        raise RecipeError(f"slices[{index}]: method {method.name!r} needs the base model "
                          f"{base_model!r} among the slice's sources")
    return base, [s for s in sl.sources if s is not base]


def _check_ranges(recipe: Recipe, readers: Mapping[str, CheckpointReader], views: Mapping[str, ModelView]) -> None:
    for i, sl in enumerate(recipe.slices or []):
        for j, src in enumerate(sl.sources):
            config = readers[src.model].config
            available = num_layers(config) if config else count_layers(views[src.model])
            if src.layer_range[1] > available:
                raise RecipeError(f"slices[{i}].sources[{j}]: layer_range {list(src.layer_range)} "
                                  f"exceeds the {available} layers of {src.model}")


def plan_slices(recipe: Recipe, method: MethodSpec, readers: Mapping[str, CheckpointReader],
                seed: int) -> MergePlan:
    assert recipe.slices is not None
    maps = prefix_maps(recipe)
    views = {key: ModelView(key, readers[key], maps.get(key, {})) for key in recipe.source_models()}
    first = recipe.slices[0].sources[0].model
    reference = recipe.base_model if recipe.base_model is not None else first
    ref_view = views[reference]
    config = readers[reference].config or {}
    _check_ranges(recipe, readers, views)

    layer_templates = {key: [n for n in view.to_source if describe_tensor(n, view.architecture).layer is not None]
                       for key, view in views.items()}
    layer_ops: list[TensorOp] = []
    out_layer = 0
    for i, sl in enumerate(recipe.slices):
        length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        base_src, others = _split(sl, i, method, recipe)
        check_model_count(method, len(others), f"slices[{i}]")
        lead = sl.sources[0]
        lead_view = views[lead.model]
        for offset in range(length):
            lead_layer = lead.layer_range[0] + offset
            templates = [n for n in layer_templates[lead.model]
                         if describe_tensor(n, lead_view.architecture).layer == lead_layer]
            for template in templates:
                out_name = with_layer(template, out_layer)

                def ref_for(src: Any) -> tuple[ModelView, str]:
                    view = views[src.model]
                    return view, source_name(view, with_layer(template, src.layer_range[0] + offset))

                params = resolve_params(method, TensorPosition(out_name, offset, length),
                                        [s.parameters for s in others], [sl.parameters, recipe.parameters],
                                        recipe.compat)
                layer_ops.append(merge_op(out_name, method, recipe, ref_for(base_src) if base_src else None,
                                          [ref_for(s) for s in others], params, seed))
            out_layer += 1

    ops: list[TensorOp] = []
    inserted = False
    for out_name in ref_view.to_source:
        info = describe_tensor(out_name, ref_view.architecture)
        if info.layer is not None:
            if not inserted:
                ops.extend(layer_ops)
                inserted = True
            continue
        if not method.uses_base(recipe.base_model) and recipe.base_model is not None:
            # shoal's reading of a base for a method that takes none: the model the tensors outside
            # the layers come from (a layer-path export names its first source so); mergekit ignores it
            ops.append(copy_op(out_name, ref_view, recipe, seed))
            continue
        # before the layers: the first slice's sources; after them: the last slice's
        index = 0 if info.role == "embed" else len(recipe.slices) - 1
        sl = recipe.slices[index]
        base_src, others = _split(sl, index, method, recipe)
        params = resolve_params(method, TensorPosition(out_name, None, 1), [s.parameters for s in others],
                                [sl.parameters, recipe.parameters], recipe.compat)
        base = (views[base_src.model], source_name(views[base_src.model], out_name)) if base_src else None
        refs = [(views[s.model], source_name(views[s.model], out_name)) for s in others]
        ops.append(merge_op(out_name, method, recipe, base, refs, params, seed))
    if not inserted:
        ops.extend(layer_ops)
    warnings = ()
    if not method.uses_base(recipe.base_model) and recipe.base_model is not None:
        warnings = (f"base_model with `{method.name}`: the embeddings, final norm and lm_head are copied from "
                    f"{recipe.base_model} (mergekit ignores base_model here and takes them from the first and "
                    "last slices' models)",)
    return MergePlan(recipe=recipe, method=method.name, ops=tuple(ops), reference=reference,
                     tokenizer_source=tokenizer_source(recipe, reference),
                     config_updates=config_updates(recipe, config, ops, layers=out_layer), warnings=warnings)
