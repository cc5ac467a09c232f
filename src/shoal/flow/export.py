"""Export a path whose scales are all 1 as a plain checkpoint of the source architecture.

Hop ``i`` becomes decoder layer ``i`` (layer stacking, as a passthrough ``slices`` recipe does);
embeddings, final norm and head are the first source's. The result loads with transformers
alone and computes exactly what the layer-path runtime computes. A path with other scales has
no such form (a scaled residual stream is not a weight), so it stays a layer-path model.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from shoal.checkpoint import (ShardedWriter, copy_support_files, describe_tensor, open_checkpoint,
                              staged_output, with_layer, write_model_card)
from shoal.checkpoint.support_files import update_config
from shoal.errors import ConfigError, MergeError
from shoal.flow.build import check_sources, open_sources
from shoal.flow.path import LayerPath, check_path, make_path
from shoal.flow.slices import slices_from_path
from shoal.progress import ProgressFn, no_progress

# Config keys that shape a decoder layer: every source a path uses must agree with the first.
LAYER_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "head_dim", "hidden_act", "attention_bias", "mlp_bias", "rms_norm_eps")


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


def _write(out: Path, tensors: Iterator[tuple[str, torch.Tensor]], support: Path, config: dict,
           path: LayerPath, names: Sequence[str], overwrite: bool) -> Path:
    with staged_output(out, overwrite=overwrite) as stage:
        with ShardedWriter(stage) as writer:
            for name, tensor in tensors:
                writer.add(name, tensor)
        copy_support_files(support, stage)
        (stage / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        recipe = slices_from_path(names, path)
        write_model_card(stage, sources=list(names), method="passthrough", recipe_yaml=recipe.to_yaml(),
                         base_model=recipe.base_model)
    return out


def _stacked_names(path: LayerPath, layer_names: Callable[[int, int], list[str]]
                   ) -> Iterator[tuple[str, int, str]]:
    """``(output name, model, source name)`` for every decoder tensor of the stacked model."""
    for i, hop in enumerate(path):
        for name in layer_names(hop.model, hop.layer):
            yield with_layer(name, i), hop.model, name


def export_path(sources: Sequence[str | Path], path: LayerPath, out: str | Path, *, overwrite: bool = False,
                progress: ProgressFn = no_progress) -> Path:
    """Write the all-ones ``path`` over ``sources`` as a plain checkpoint (streamed, tensor by tensor)."""
    _require_all_ones(path)
    names = [str(s) for s in sources]
    out = Path(out)
    with ExitStack() as stack:
        readers = open_sources(sources, stack)
        counts = check_sources(readers, names)
        check_path(path, counts, names=names)
        configs = [r.config or {} for r in readers]
        check_uniform_layers(configs, names, path.models_used())
        by_layer: list[dict[int, list[str]]] = []
        for reader in readers:
            arch = reader.config.get("model_type") if reader.config else None
            table: dict[int, list[str]] = {}
            for name in reader.tensor_names():
                layer = describe_tensor(name, arch).layer
                if layer is not None:
                    table.setdefault(layer, []).append(name)
            by_layer.append(table)
        base_arch = configs[0].get("model_type")
        outer = [n for n in readers[0].tensor_names() if describe_tensor(n, base_arch).layer is None]
        total = len(outer) + sum(len(by_layer[h.model].get(h.layer, [])) for h in path)

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            done = 0
            for name in outer:
                yield name, readers[0].get(name)
                done += 1
                progress("export", done, total)
            for out_name, m, name in _stacked_names(path, lambda m, layer: by_layer[m].get(layer, [])):
                yield out_name, readers[m].get(name)
                done += 1
                progress("export", done, total)

        config = update_config(configs[0], {"num_hidden_layers": len(path)})
        return _write(out, tensors(), Path(readers[0].path), config, path, names, overwrite)


def export_path_model(folder: str | Path, out: str | Path, *, overwrite: bool = False,
                      progress: ProgressFn = no_progress) -> Path:
    """Write a saved layer-path folder (all scales 1) as a plain checkpoint of its first source's
    architecture; its weights come from the folder itself, not from the sources."""
    folder = Path(folder)
    with ExitStack() as stack:
        reader = stack.enter_context(open_checkpoint(folder))
        config: dict[str, Any] = reader.config or {}
        if config.get("model_type") != "shoal_layer_path":
            raise ConfigError(f"{folder}: not a layer-path model (model_type {config.get('model_type')!r})")
        path = make_path(config.get("path") or [])
        _require_all_ones(path)
        names = list(config.get("sources") or [])
        source_configs = list(config.get("source_configs") or [])
        check_uniform_layers(source_configs, names or [f"model {i}" for i in range(len(source_configs))],
                             path.models_used())
        slot = {(int(m), int(layer)): k for k, (m, layer) in enumerate(config.get("layers") or [])}
        stored: dict[int, list[str]] = {}
        outer = []
        for name in reader.tensor_names():
            if name.startswith("model.blocks."):
                k = int(name.split(".")[2])
                stored.setdefault(k, []).append(name)
            else:
                outer.append(name)
        total = len(outer) + sum(len(stored.get(slot[h.key], [])) for h in path)

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            done = 0
            for name in outer:
                yield name, reader.get(name)
                done += 1
                progress("export", done, total)
            for i, hop in enumerate(path):
                k = slot[hop.key]
                for name in stored.get(k, []):
                    yield name.replace(f"model.blocks.{k}.", f"model.layers.{i}.", 1), reader.get(name)
                    done += 1
                    progress("export", done, total)

        plain = update_config(source_configs[0], {"num_hidden_layers": len(path)})
        plain.pop("_name_or_path", None)
        if config.get("dtype"):
            plain = update_config(plain, {"dtype": config["dtype"]})
        return _write(Path(out), tensors(), folder, plain, path, names, overwrite)
