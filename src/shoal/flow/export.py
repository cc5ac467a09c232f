"""Export a path whose scales are all 1 as a plain checkpoint of the source architecture.

Hop ``i`` becomes decoder layer ``i``; embeddings, final norm and head are the first source's.
That is layer stacking, which the passthrough merge of a ``slices`` recipe already does, so an
export *is* that merge (:func:`stack_layers`): over the sources, of the recipe
:func:`~shoal.flow.slices.slices_from_path` gives; over a saved layer-path folder, of a recipe
whose one source is the folder, its stored ``model.blocks.k`` renamed to decoder layers by a
prefix map. The result loads with transformers alone and computes exactly what the layer-path
runtime computes. A path with other scales has no such form (a scaled residual stream is not a
weight), so it stays a layer-path model.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

from shoal.checkpoint import open_checkpoint, staged_output, write_model_card
from shoal.checkpoint.support_files import update_config
from shoal.errors import ConfigError, MergeError
from shoal.flow.build import check_sources, open_sources
from shoal.flow.configuration_layer_path import MODEL_TYPE
from shoal.flow.path import LayerPath, check_path, make_path
from shoal.flow.slices import slices_from_path
from shoal.merge.recipe import Recipe, parse_recipe
from shoal.progress import ProgressFn, no_progress

# Config keys that shape a decoder layer: every source a path uses must agree with the first.
LAYER_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "head_dim", "hidden_act", "attention_bias", "mlp_bias", "rms_norm_eps")
BLOCK_PREFIX = "model.blocks."


def stack_layers(recipe: Recipe, out: Path, *, overwrite: bool, progress: ProgressFn) -> Path:
    """The one call into the merge package: run a passthrough ``slices`` recipe into ``out``."""
    from shoal.merge.execute import merge

    def report(stage: str, done: int, total: int | None) -> None:
        progress("export", done, total)

    return merge(recipe, out, overwrite=overwrite, progress=report).out


def _require_all_ones(path: LayerPath) -> None:
    scaled = [(i, h.scale) for i, h in enumerate(path) if h.scale != 1.0]
    if scaled:
        i, scale = scaled[0]
        raise MergeError(f"path[{i}] has scale {scale}: only a path whose scales are all 1 can be exported "
                         "to the source architecture; keep it as a layer-path model")


def check_uniform_layers(configs: Sequence[dict], names: Sequence[str], used: Sequence[int]) -> None:
    """Raise :class:`MergeError` unless every used source's layers have the first source's shape,
    as one plain config must describe them all."""
    base = configs[0]
    for m in used:
        for key in LAYER_KEYS:
            if configs[m].get(key) != base.get(key):
                raise MergeError(f"{names[m]}: {key} is {configs[m].get(key)!r} but {base.get(key)!r} in "
                                 f"{names[0]}; its layers cannot be stacked into one {base.get('model_type')} model")


def export_path(sources: Sequence[str | Path], path: LayerPath, out: str | Path, *, overwrite: bool = False,
                progress: ProgressFn = no_progress) -> Path:
    """Write the all-ones ``path`` over ``sources`` as a plain checkpoint (streamed, tensor by tensor)."""
    _require_all_ones(path)
    names = [str(s) for s in sources]
    with ExitStack() as stack:  # the path's own checks first: they name hops, not recipe slices
        readers = open_sources(sources, stack)
        counts = check_sources(readers, names)
        check_path(path, counts, names=names)
        check_uniform_layers([r.config or {} for r in readers], names, path.models_used())
    return stack_layers(slices_from_path(names, path), Path(out), overwrite=overwrite, progress=progress)


def folder_recipe(folder: Path, path: LayerPath, layers: Sequence[Sequence[int]], tensor_names: Sequence[str]
                  ) -> Recipe:
    """The passthrough recipe that stacks a saved layer-path folder's own stored layers.

    Its prefix map renames the stored layers the path uses to ``model.layers.c`` (``c`` in
    order of first use, so every layer range lies within the hop count config.json declares),
    keeps the tensors outside the layers, and drops stored layers the path does not use."""
    slot = {(int(m), int(layer)): k for k, (m, layer) in enumerate(layers)}
    missing = [list(h.key) for h in path if h.key not in slot]
    if missing:
        raise ConfigError(f"{folder}: path uses layers that are not stored in the folder: {missing[:5]}")
    compact = {slot[key]: c for c, key in enumerate(path.distinct_layers())}
    prefix_map = {f"{BLOCK_PREFIX}{k}.": f"model.layers.{c}." for k, c in compact.items()}
    prefix_map.update({name: name for name in tensor_names if not name.startswith(BLOCK_PREFIX)})
    slices = []
    for hop in path:
        c = compact[slot[hop.key]]
        slices.append({"sources": [{"model": str(folder), "layer_range": [c, c + 1], "prefix_map": prefix_map}]})
    return parse_recipe({"merge_method": "passthrough", "slices": slices}, where=str(folder))


def export_path_model(folder: str | Path, out: str | Path, *, overwrite: bool = False,
                      progress: ProgressFn = no_progress) -> Path:
    """Write a saved layer-path folder (all scales 1) as a plain checkpoint of its first source's
    architecture; its weights come from the folder itself, not from the sources."""
    folder = Path(folder)
    with open_checkpoint(folder) as reader:
        config: dict[str, Any] = reader.config or {}
        tensor_names = list(reader.tensor_names())
    if config.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"{folder}: not a layer-path model (model_type {config.get('model_type')!r})")
    path = make_path(config.get("path") or [])
    _require_all_ones(path)
    names = list(config.get("sources") or [])
    source_configs = list(config.get("source_configs") or [])
    check_uniform_layers(source_configs, names or [f"model {i}" for i in range(len(source_configs))],
                         path.models_used())
    recipe = folder_recipe(folder, path, config.get("layers") or [], tensor_names)
    plain = update_config(source_configs[0], {"num_hidden_layers": len(path)})
    plain.pop("_name_or_path", None)
    if config.get("dtype"):
        plain = update_config(plain, {"dtype": config["dtype"]})
    # the card describes the path over its sources, not the folder-internal recipe
    described = slices_from_path(names, path)
    with staged_output(Path(out), overwrite=overwrite) as stage:
        stack_layers(recipe, stage, overwrite=True, progress=progress)
        (stage / "config.json").write_text(json.dumps(plain, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        write_model_card(stage, sources=names, method="passthrough", recipe_yaml=described.to_yaml(),
                         base_model=described.base_model)
    return Path(out)
