"""Checks of a recipe against its method and its sources that the schema alone cannot make.

- A parameter the method takes as a number must not be given as true/false (YAML reads ``true``
  as a boolean; taking it as 1 would silently change the merge).
- A ``models`` recipe merges layer by layer: every model needs the reference's layer count, or
  the extra layers would be dropped without a word (``slices`` say which layers go where).
- Merge methods work on floating-point tensors: an integer or boolean source tensor (a header
  that relabels F32 as I32 has the same byte length) in a merge is refused, naming the tensor.
  Tensors the plan copies keep whatever dtype they have.
"""

from __future__ import annotations

from typing import Mapping

from shoal.checkpoint import CheckpointReader, describe_tensor, map_prefix
from shoal.checkpoint.dtypes import is_floating
from shoal.errors import MergeError, RecipeError
from shoal.merge.model_view import architecture
from shoal.merge.recipe import FilterValue, ParamValue, Recipe
from shoal.merge.registry import MethodSpec


def _has_bool(value: ParamValue) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, list):
        return any(_has_bool(entry.value) if isinstance(entry, FilterValue) else isinstance(entry, bool)
                   for entry in value)
    return False


def check_parameter_kinds(recipe: Recipe, method: MethodSpec) -> None:
    """Refuse true/false where ``method`` takes a number, naming where in the recipe."""
    kinds = {p.name: p.kind for p in method.params}
    places: list[tuple[str, Mapping[str, ParamValue]]] = [("parameters", recipe.parameters)]
    places += [(f"models[{i}] ({m.model}).parameters", m.parameters) for i, m in enumerate(recipe.models or [])]
    for i, sl in enumerate(recipe.slices or []):
        places.append((f"slices[{i}].parameters", sl.parameters))
        places += [(f"slices[{i}].sources[{j}] ({s.model}).parameters", s.parameters)
                   for j, s in enumerate(sl.sources)]
    for where, params in places:
        for key, value in params.items():
            if kinds.get(key, "bool") != "bool" and _has_bool(value):
                raise RecipeError(f"{where}.{key}: parameter {key!r} of {method.name!r} is a number, "
                                  "got true/false")


def _layers(reader: CheckpointReader, prefix_map: Mapping[str, str], within: tuple[str, ...] = ()) -> set[int]:
    """Decoder layer indices of ``reader`` in the output's names (after ``prefix_map``), only those
    of names starting with one of ``within`` when given."""
    arch = architecture(reader.config or {})
    layers = set()
    for name in reader.tensor_names():
        mapped = map_prefix(name, dict(prefix_map)) if prefix_map else name
        if mapped is None or (within and not mapped.startswith(within)):
            continue
        if (layer := describe_tensor(mapped, arch).layer) is not None:
            layers.add(layer)
    return layers


def check_layer_counts(recipe: Recipe, readers: Mapping[str, CheckpointReader]) -> None:
    """A ``models`` recipe over models with different numbers of decoder layers is refused."""
    if recipe.models is None:
        return
    maps = {m.model: m.prefix_map for m in recipe.models}
    if recipe.base_model is not None:
        maps[recipe.base_model] = recipe.base_prefix_map or maps.get(recipe.base_model, {})
    reference = recipe.base_model if recipe.base_model is not None else recipe.models[0].model
    for model in recipe.source_models():
        if model == reference:
            continue
        # a model with a prefix map covers part of the reference (e.g. a VLM's language model)
        within = tuple(maps.get(model, {}).values())
        wanted = _layers(readers[reference], maps.get(reference, {}), within)
        found = _layers(readers[model], maps.get(model, {}))
        if found and wanted and len(found) != len(wanted):
            raise RecipeError(
                f"models: {reference} has {len(wanted)} layers but {model} has {len(found)}; a 'models' "
                "recipe merges layer by layer over models of one depth (use 'slices' with layer_range "
                "to say which layers to merge)")


def check_floating_sources(ops: tuple, readers: Mapping[str, CheckpointReader], copy: str) -> None:
    """Every source tensor of a merge op (not a copy) is floating point, or the op is refused."""
    for op in ops:
        if op.method == copy:
            continue
        for ref in op.sources:
            dtype = readers[ref.model].dtype_name(ref.tensor)
            if not is_floating(dtype):
                raise MergeError(
                    f"{readers[ref.model].shard_path(ref.tensor)}: tensor {ref.tensor!r} is "
                    f"{dtype}, not floating point: method {op.method!r} "
                    "merges floating-point weights only (is its header's dtype wrong?)")
