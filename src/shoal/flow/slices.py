"""Passthrough ``slices`` recipes (hand-written frankenmerges) as layer paths.

A recipe such as::

    merge_method: passthrough
    slices:
      - sources: [{model: A, layer_range: [0, 6]}]
      - sources: [{model: B, layer_range: [4, 10]}]

stacks layers A0..A5, B4..B9 under A's embeddings and head: the path
``[(0,0),...,(0,5),(1,4),...,(1,9)]`` with scales 1 over the sources ``[A, B]``. So such a recipe
runs in the layer-path runtime (without writing the stacked weights) and exports exactly to
what ``shoal merge`` writes.
"""

from __future__ import annotations

from typing import Sequence

from shoal.errors import MergeError, RecipeError
from shoal.flow.path import Hop, LayerPath
from shoal.merge.recipe import Recipe, parse_recipe


def path_from_slices(recipe: Recipe) -> tuple[list[str], LayerPath]:
    """``(sources, path)`` of a passthrough ``slices`` recipe; the reference model (the base
    model, or the first slice's first source) is source 0, as it gives embeddings and head."""
    if recipe.merge_method != "passthrough" or recipe.slices is None:
        raise RecipeError("only a 'passthrough' recipe with 'slices' is a layer path "
                          f"(got merge_method {recipe.merge_method!r} with "
                          f"{'slices' if recipe.slices is not None else 'models'})")
    reference = recipe.base_model if recipe.base_model is not None else recipe.slices[0].sources[0].model
    if recipe.tokenizer_source not in (None, "base", reference):
        raise RecipeError(f"tokenizer_source {recipe.tokenizer_source!r}: a layer path uses the tokenizer of "
                          f"its first model {reference!r}")
    if recipe.parameters:
        raise RecipeError(f"parameters: a layer path has no merge parameters, got {sorted(recipe.parameters)}")
    sources = [reference] + [m for m in recipe.source_models() if m != reference]
    index = {name: i for i, name in enumerate(sources)}
    hops: list[Hop] = []
    for i, sl in enumerate(recipe.slices):
        if len(sl.sources) != 1:
            raise RecipeError(f"slices[{i}]: passthrough takes one source per slice, got {len(sl.sources)}")
        source = sl.sources[0]
        # passthrough's `scale` multiplies weights, which is not a hop's input scale
        for where, params in ((f"slices[{i}].parameters", sl.parameters),
                              (f"slices[{i}].sources[0].parameters", source.parameters)):
            extra = {k: v for k, v in params.items() if not (k == "scale" and v == 1.0)}
            if extra:
                raise RecipeError(f"{where}: {sorted(extra)} cannot be expressed as a layer path "
                                  "(only scale 1 is)")
        if source.prefix_map:
            raise RecipeError(f"slices[{i}].sources[0].prefix_map: not supported in a layer path")
        start, end = source.layer_range
        hops.extend(Hop(index[source.model], layer) for layer in range(start, end))
    return sources, LayerPath(tuple(hops))


def slices_from_path(sources: Sequence[str], path: LayerPath) -> Recipe:
    """The passthrough ``slices`` recipe of an all-ones path (runs of consecutive layers of one
    model become one slice); ``shoal merge`` of it writes what :func:`export_path` writes."""
    if not path.all_ones:
        raise MergeError("only a path whose scales are all 1 is a passthrough recipe")
    runs: list[list[int]] = []  # [model, start, end)
    for hop in path:
        if runs and runs[-1][0] == hop.model and runs[-1][2] == hop.layer:
            runs[-1][2] += 1
        else:
            runs.append([hop.model, hop.layer, hop.layer + 1])
    slices = [{"sources": [{"model": str(sources[m]), "layer_range": [start, end]}]} for m, start, end in runs]
    data: dict = {"merge_method": "passthrough", "slices": slices}
    if runs[0][0] != 0:
        data["base_model"] = str(sources[0])  # the first source gives embeddings and head
    return parse_recipe(data, where="layer path")
