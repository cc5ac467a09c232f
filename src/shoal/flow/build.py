"""Assemble a layer-path model from source model folders, and save it as a Hugging Face folder.

Each distinct ``(model, layer)`` is read once and stored once, however often the path runs it.
The first source gives the embeddings, final norm, head, rotary embedding and tokenizer.
"""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from shoal.checkpoint import CheckpointReader, num_layers, open_checkpoint, staged_output
from shoal.checkpoint.support_files import SUPPORT_FILES
from shoal.errors import CheckpointError, ConfigError
from shoal.flow.path import LayerPath, check_path, make_path
from shoal.flow.registration import register
from shoal.progress import ProgressFn, no_progress

OUTER_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
PATH_FILENAME = "layer_path.json"


def resolve_source(name: str | Path) -> str:
    """A source's folder or file: every reference (``zoo:SIZE/NAME``, run folders, hub ids) goes
    through the one resolver."""
    from shoal.checkpoint.references import resolve_model_ref

    return resolve_model_ref(name)


def open_sources(sources: Sequence[str | Path], stack: ExitStack) -> list[CheckpointReader]:
    """Open every source checkpoint (closed with ``stack``); each must have a config.json."""
    if len(sources) < 1:
        raise ConfigError("a layer path needs at least one source model")
    readers = []
    for name in sources:
        reader = stack.enter_context(open_checkpoint(resolve_source(name)))
        if not reader.config:
            raise CheckpointError(f"{name}: no config.json next to the weights")
        readers.append(reader)
    return readers


def check_sources(readers: Sequence[CheckpointReader], names: Sequence[str]) -> list[int]:
    """Layer counts of the sources; raises unless they share hidden and head sizes."""
    configs = [_source_config(r.config or {}, n) for r, n in zip(readers, names)]
    base = configs[0]
    for name, cfg in zip(names[1:], configs[1:]):
        for key, size in (("hidden_size", lambda c: c.hidden_size), ("head size", _head_size)):
            if size(cfg) != size(base):
                raise ConfigError(f"{name}: {key} {size(cfg)} differs from {names[0]}'s "
                                  f"{size(base)}; a layer path needs equal sizes")
    return [num_layers(r.config or {}, source=n) for r, n in zip(readers, names)]


def source_layer_counts(sources: Sequence[str | Path]) -> tuple[int, ...]:
    """The decoder layer count of each source (what :class:`~shoal.flow.genome.DfsLayout` needs);
    raises unless the sources can share a path."""
    names = [str(s) for s in sources]
    with ExitStack() as stack:
        return tuple(check_sources(open_sources(sources, stack), names))


def _source_config(data: dict, name: str) -> Any:
    """The runtime's config object for one source; what it cannot run is a :class:`ConfigError`."""
    from shoal.flow.modeling_layer_path import LayerPathError, source_config

    try:
        return source_config(data, source=name)
    except LayerPathError as err:
        raise ConfigError(str(err)) from None


def _head_size(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_table(path: LayerPath, layer_counts: Sequence[int], keep: Literal["used", "all"]) -> list[list[int]]:
    """The stored layers: those the path uses (in order of first use), or every source layer."""
    if keep == "used":
        return [list(k) for k in path.distinct_layers()]
    if keep == "all":
        return [[m, layer] for m, count in enumerate(layer_counts) for layer in range(count)]
    raise ConfigError(f"keep must be 'used' or 'all', got {keep!r}")


def path_config(names: Sequence[str], source_configs: Sequence[dict], layers: list[list[int]],
                path: LayerPath, dtype: torch.dtype) -> Any:
    from shoal.flow.configuration_layer_path import LayerPathConfig

    config = LayerPathConfig(sources=list(names), source_configs=[_clean(c) for c in source_configs],
                             layers=layers, path=path.to_list(), dtype=dtype)
    config.architectures = ["LayerPathForCausalLM"]
    return config


def _clean(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("transformers_version", "_name_or_path")}


def _tensor(reader: CheckpointReader, name: str, dtype: torch.dtype, device: str) -> torch.Tensor:
    if name not in reader:
        raise CheckpointError(f"{reader.source}: tensor {name!r} is missing")
    return reader.get(name, dtype=dtype, device=device)


def build_path_model(sources: Sequence[str | Path], path: LayerPath, *, keep: Literal["used", "all"] = "used",
                     dtype: torch.dtype = torch.float32, device: str = "cpu",
                     progress: ProgressFn = no_progress) -> Any:
    """A :class:`~shoal.flow.modeling.LayerPathForCausalLM` running ``path`` over ``sources``.

    ``keep="all"`` stores every layer of every source, so that :meth:`set_path` can switch
    to any other path without reading weights again (what a search over paths wants).
    """
    from shoal.flow.modeling_layer_path import LayerPathForCausalLM

    register()
    names = [str(s) for s in sources]
    with ExitStack() as stack:
        readers = open_sources(sources, stack)
        counts = check_sources(readers, names)
        check_path(path, counts, names=names)
        table = layer_table(path, counts, keep)
        config = path_config(names, [r.config or {} for r in readers], table, path, dtype)
        with torch.device("meta"):
            model = LayerPathForCausalLM(config)
        state: dict[str, torch.Tensor] = {}
        base = readers[0]
        for name in OUTER_TENSORS:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            state[name] = _tensor(base, name, dtype, device)
        for k, (m, layer) in enumerate(table):
            for rest in model.model.blocks[k].state_dict():
                state[f"model.blocks.{k}.{rest}"] = _tensor(readers[m], f"model.layers.{layer}.{rest}",
                                                            dtype, device)
            progress("build", k + 1, len(table))
        generation_config = _generation_config(readers[0], model.generation_config)
    _fill(model, state, device)
    model.generation_config = generation_config
    return model.eval()


def _fill(model: Any, state: dict[str, torch.Tensor], device: str | torch.device) -> None:
    """Give a model built on the meta device its tensors (by reference) and a fresh rotary embedding."""
    from shoal.flow.modeling_layer_path import family_classes

    tied = model.config.tie_word_embeddings
    model.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    base = model.model.source_configs[0]
    model.model.rotary_emb = family_classes(base.model_type).rotary(config=base).to(device)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:  # pragma: no cover - a module with state the build does not know about
        raise CheckpointError(f"layer-path build left tensors unset: {on_meta[:3]}")


def prune_path_model(model: Any) -> Any:
    """``model`` with only the layers its current path uses (tensors shared, not copied);
    ``model`` itself when it stores nothing else."""
    from shoal.flow.configuration_layer_path import LayerPathConfig

    used = [list(k) for k in make_path(model.config.path).distinct_layers()]
    if used == [list(k) for k in model.config.layers]:
        return model
    config = LayerPathConfig.from_dict(model.config.to_dict())
    config.layers = used
    with torch.device("meta"):
        pruned = type(model)(config)
    old = model.model
    state = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith("model.blocks.")}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for k, (m, layer) in enumerate(used):
        block = old.blocks[old.table[(m, layer)]]
        state.update({f"model.blocks.{k}.{rest}": t for rest, t in block.state_dict().items()})
    device = next(model.parameters()).device
    _fill(pruned, state, device)
    pruned.generation_config = model.generation_config
    return pruned.eval() if not model.training else pruned


def _generation_config(reader: CheckpointReader, default: Any) -> Any:
    from transformers import GenerationConfig

    folder = Path(reader.path) if Path(reader.path).is_dir() else Path(reader.path).parent
    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(folder)
    return default


def save_path_model(model: Any, out: str | Path, *, tokenizer_source: str | Path | None = None,
                    overwrite: bool = False) -> Path:
    """Write ``model`` as a Hugging Face folder: config, weights (each layer its path uses, once),
    the first source's tokenizer and generation config, and ``layer_path.json`` (the hops).

    ``tokenizer_source`` defaults to the first source named in the config.
    """
    out = Path(out)
    source = resolve_source(tokenizer_source if tokenizer_source is not None else model.config.sources[0])
    folder = Path(source)
    if not folder.is_dir():
        folder = folder.parent
    model = prune_path_model(model)
    with staged_output(out, overwrite=overwrite) as stage:
        model.save_pretrained(stage)
        for name in SUPPORT_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, stage / name)
        summary = {"sources": model.config.sources, "path": model.config.path}
        (stage / PATH_FILENAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return out


def write_path_model(sources: Sequence[str | Path], path: LayerPath, out: str | Path, *,
                     dtype: torch.dtype = torch.float32, overwrite: bool = False,
                     progress: ProgressFn = no_progress) -> Path:
    """Build the path model of ``sources`` and save it to ``out`` in one call."""
    model = build_path_model(sources, path, dtype=dtype, progress=progress)
    return save_path_model(model, out, tokenizer_source=sources[0], overwrite=overwrite)
