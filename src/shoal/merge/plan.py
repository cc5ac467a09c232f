"""Turn a recipe into a merge plan: one operation per output tensor, no tensor data read.

Planning reads only headers (names, shapes, dtypes) and configs, so every problem a user can
cause — a missing tensor, mismatched shapes, an unknown parameter, a bad layer range — is found
before the first byte of output is written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from shoal.checkpoint import CheckpointReader, describe_tensor, layer_count_key, num_layers
from shoal.checkpoint.chat_templates import resolve_chat_template
from shoal.checkpoint.diffusion import is_diffusion
from shoal.checkpoint.dtypes import HALF, itemsize, name_of
from shoal.errors import MergeError, RecipeError
from shoal.merge.model_view import ModelView as _ModelView
from shoal.merge.model_view import architecture as _architecture
from shoal.merge.model_view import count_layers as _count_layers
from shoal.merge.params import TensorPosition
from shoal.merge.plan_modes import mode_warning
from shoal.merge.plan_params import check_model_count, check_parameter_names, resolve_params
from shoal.merge.recipe import Recipe
from shoal.merge.registry import MethodSpec, get_method, python_name
from shoal.merge.source_checks import check_floating_sources, check_layer_counts, check_parameter_kinds

COPY = "copy"



@dataclass(frozen=True)
class SourceRef:
    """One tensor of one source model."""

    model: str  # the model as named in the recipe
    tensor: str  # the tensor's name inside that model's checkpoint


@dataclass(frozen=True)
class TensorOp:
    """How to produce one output tensor.

    Dtypes are names (``"bfloat16"``: :mod:`shoal.checkpoint.dtypes`; a ``torch.dtype`` given is
    read as its name), so a plan is made and run without torch where no tensor is computed with
    it; :func:`~shoal.checkpoint.dtypes.torch_dtype` gives the ``torch.dtype``.
    """

    name: str
    method: str  # a registered merge method, or ``copy``
    base: SourceRef | None
    models: tuple[SourceRef, ...]
    params: tuple[tuple[str, Any], ...]  # per-model parameters as tuples, in ``models`` order
    shape: tuple[int, ...]
    out_dtype: str
    seed: int
    # the dtype sources are widened to before the method runs (None: as stored): float32 for
    # half-precision sources whose result is written in another dtype, so that the result is
    # rounded once, to the output dtype, and never to the inputs' precision on the way
    compute_dtype: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dtype", name_of(self.out_dtype))
        if self.compute_dtype is not None:
            object.__setattr__(self, "compute_dtype", name_of(self.compute_dtype))

    @property
    def sources(self) -> tuple[SourceRef, ...]:
        return ((self.base,) if self.base is not None else ()) + self.models

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * itemsize(self.out_dtype)

    def kwargs(self) -> dict[str, Any]:
        return {python_name(k): (list(v) if isinstance(v, tuple) else v) for k, v in self.params}

    @classmethod
    def copy(cls, name: str, source: SourceRef, shape: tuple[int, ...], dtype: Any) -> "TensorOp":
        """An op that writes ``source`` as output tensor ``name`` (converted to ``dtype``)."""
        return cls(name=name, method=COPY, base=None, models=(source,), params=(), shape=tuple(shape),
                   out_dtype=dtype, seed=0)


@dataclass(frozen=True)
class MergePlan:
    """Everything needed to write the merged checkpoint."""

    recipe: Recipe
    method: str
    ops: tuple[TensorOp, ...]
    reference: str  # the model whose tensor names, config and layout the output follows
    tokenizer_source: str
    config_updates: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # one line each: ignored parameters, the mode a recipe runs in
    output_layout: str = "hf"  # "hf" (a model folder), "diffusers" (a pipeline folder) or "single_file"
    components: tuple[tuple[str, str], ...] = ()  # diffusion pipelines: (component, "merge" or "copy")
    # the output vocabulary when the recipe sets a tokenizer (shoal.merge.tokenizer_merge.Vocabulary):
    # executing the plan reads the sources through ``vocabulary.wrap(readers)``
    vocabulary: Any = None

    @property
    def total_bytes(self) -> int:
        return sum(op.nbytes for op in self.ops)

    def models_used(self) -> list[str]:
        return list(dict.fromkeys(ref.model for op in self.ops for ref in op.sources))


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that does not depend on the order tensors are processed in."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def plan_merge(recipe: Recipe, readers: Mapping[str, CheckpointReader], *, seed: int = 0) -> MergePlan:
    """Plan ``recipe`` over opened checkpoints (``readers`` keyed by the names the recipe uses)."""
    if recipe.modules is not None:
        from shoal.merge.plan_modules import plan_modules

        return plan_modules(recipe, readers, seed=seed)
    method = get_method(recipe.merge_method)
    warnings = check_parameter_names(recipe, method)
    if method.needs_base and recipe.base_model is None and not (
            recipe.slices and all(sl.base_model is not None for sl in recipe.slices)):
        raise RecipeError(f"method {method.name!r} needs 'base_model'")
    for name in recipe.source_models():
        if name not in readers:
            raise RecipeError(f"model {name!r} was not opened")
    if recipe.chat_template is not None and recipe.chat_template != "auto":
        resolve_chat_template(recipe.chat_template, [])  # a bad name fails here, before any output
    seed = recipe.seed if recipe.seed is not None else seed
    diffusion = any(is_diffusion(reader) for reader in readers.values())
    vocabulary = None
    if not diffusion:  # a pipeline's tokenizer_source names the tokenizer folder to copy, nothing more
        from shoal.merge.tokenizer_merge import plan_vocabulary

        vocabulary, vocab_warnings = plan_vocabulary(recipe, readers)
        warnings.extend(vocab_warnings)
        if vocabulary is not None:  # plan over the sources as they look in the output vocabulary
            readers = vocabulary.wrap(readers)
    check_parameter_kinds(recipe, method)
    if diffusion:
        from shoal.merge.plan_diffusion import check_diffusion_sources, plan_diffusion

        check_diffusion_sources(recipe, readers)
        plan = plan_diffusion(recipe, method, readers, seed)  # type: ignore[arg-type]
    elif recipe.components:
        raise RecipeError("components: applies to diffusion pipelines (model_index.json folders or single-file "
                          "Stable Diffusion checkpoints), and no model of this recipe is one")
    else:
        check_layer_counts(recipe, readers)
        plan = _plan_any(recipe, method, readers, seed)
    check_floating_sources(plan.ops, readers, COPY)
    warning = mode_warning(recipe, method)
    if warning:
        warnings.append(warning)
    if vocabulary is not None:
        plan = replace(plan, vocabulary=vocabulary.bind(plan.ops))
    return replace(plan, warnings=tuple(warnings) + plan.warnings)


def _plan_any(recipe: Recipe, method: MethodSpec, readers: Mapping[str, CheckpointReader], seed: int) -> MergePlan:
    if recipe.models is not None:
        plan = _plan_models(recipe, method, readers, seed)
    else:
        from shoal.merge.plan_slices import plan_slices

        plan = plan_slices(recipe, method, readers, seed)
    return plan


def prefix_maps(recipe: Recipe) -> dict[str, dict[str, str]]:
    maps: dict[str, dict[str, str]] = {}
    parts = [(recipe.models, recipe.slices)] if recipe.modules is None else [
        (m.models, m.slices) for m in recipe.modules.values()]
    entries = [e for models, slices in parts
               for e in list(models or []) + [s for sl in slices or [] for s in sl.sources]]
    for entry in entries:
        if entry.prefix_map:
            if entry.model in maps and maps[entry.model] != entry.prefix_map:
                raise RecipeError(f"model {entry.model!r} is given two different prefix maps")
            maps[entry.model] = dict(entry.prefix_map)
    if recipe.base_model is not None and recipe.base_prefix_map:
        maps[recipe.base_model] = dict(recipe.base_prefix_map)
    return maps


def out_dtype(recipe: Recipe, reader: CheckpointReader, name: str) -> str:
    chosen = recipe.out_dtype or recipe.dtype
    return chosen if chosen else reader.dtype_name(name)


def compute_dtype(source_dtype: str, written: str) -> str | None:
    """float32 when half-precision sources give a result in another dtype (see ``TensorOp.compute_dtype``)."""
    return "float32" if source_dtype in HALF and written != source_dtype else None


def merge_op(name: str, method: MethodSpec, recipe: Recipe, base: tuple[_ModelView, str] | None,
             refs: list[tuple[_ModelView, str]], params: tuple[tuple[str, Any], ...], seed: int) -> TensorOp:
    """The op that merges ``refs`` (and ``base``) into output tensor ``name``, shapes checked."""
    shape = check_shapes(name, ([base] if base else []) + refs)
    lead_view, lead_name = base if base is not None else refs[0]
    written = out_dtype(recipe, lead_view.reader, lead_name)
    return TensorOp(name=name, method=method.name,
                    base=SourceRef(base[0].key, base[1]) if base else None,
                    models=tuple(SourceRef(v.key, n) for v, n in refs), params=params, shape=shape,
                    out_dtype=written, seed=tensor_seed(seed, name),
                    compute_dtype=compute_dtype(lead_view.reader.dtype_name(lead_name), written))


def check_shapes(out_name: str, refs: list[tuple[_ModelView, str]]) -> tuple[int, ...]:
    first_view, first_name = refs[0]
    shape = first_view.reader.shape(first_name)
    for view, name in refs[1:]:
        other = view.reader.shape(name)
        if other != shape:
            raise MergeError(f"shape mismatch for tensor {out_name!r}: {first_view.key} has "
                             f"{list(shape)}, {view.key} has {list(other)} (tensor {name!r})")
    return tuple(shape)


def source_name(view: _ModelView, out_name: str) -> str:
    name = view.source_name(out_name)
    if name is None:
        raise MergeError(f"tensor {out_name!r} is missing from model {view.key}")
    return name


def _plan_models(recipe: Recipe, method: MethodSpec, readers: Mapping[str, CheckpointReader],
                 seed: int) -> MergePlan:
    assert recipe.models is not None
    maps = prefix_maps(recipe)
    views = {key: _ModelView(key, readers[key], maps.get(key, {})) for key in recipe.source_models()}
    base_key = recipe.base_model
    entries = [m for m in recipe.models if not (method.uses_base(base_key) and m.model == base_key)]
    check_model_count(method, len(entries), "models")
    reference = output_reference(recipe, maps)
    ref_view = views[reference]
    base_view = views[base_key] if base_key is not None and method.uses_base(base_key) else None
    config = readers[reference].config or {}
    total_layers = num_layers(config) if config else _count_layers(ref_view)

    ops: list[TensorOp] = []
    for out_name in ref_view.to_source:
        info = describe_tensor(out_name, ref_view.architecture)
        # the whole model is one slice: its layers at t = layer / (layers - 1), the rest at t = 0
        position = TensorPosition(out_name, info.layer, total_layers)
        covering = [e for e in entries if views[e.model].covers(out_name)]
        if base_view is not None and not base_view.covers(out_name) and len(covering) > 1:
            raise RecipeError(f"tensor {out_name!r}: base_model {base_key}'s prefix map does not reach it, "
                              f"but {len(covering)} models have it; the method needs the base's tensor")
        if len(covering) < len(entries) or not covering or (base_view is not None
                                                             and not base_view.covers(out_name)):
            # Outside some model's prefix map (e.g. a vision tower): the reference's own tensor.
            ops.append(copy_op(out_name, ref_view, recipe, seed))
            continue
        base = (base_view, source_name(base_view, out_name)) if base_view is not None else None
        refs = [(views[e.model], source_name(views[e.model], out_name)) for e in covering]
        params = resolve_params(method, position, [e.parameters for e in covering], [recipe.parameters],
                                recipe.compat)
        ops.append(merge_op(out_name, method, recipe, base, refs, params, seed))
    return MergePlan(recipe=recipe, method=method.name, ops=tuple(ops), reference=reference,
                     tokenizer_source=tokenizer_source(recipe, reference),
                     config_updates=config_updates(recipe, config, ops))


def output_reference(recipe: Recipe, maps: Mapping[str, Mapping[str, str]]) -> str:
    """The model whose tensor names, config and support files the output follows: the base model,
    or the first model when there is none. A base seen through a prefix map lives in another
    model's namespace (an LLM base merged into a VLM's language model), so then the first model
    without a prefix map is the reference: the VLM, whose vision tower and projector are copied."""
    assert recipe.models is not None
    base = recipe.base_model
    if base is None:
        return recipe.models[0].model
    if not maps.get(base):
        return base
    unmapped = [m.model for m in recipe.models if m.model != base and not maps.get(m.model)]
    if not unmapped:
        raise RecipeError(f"base_model {base!r} has a prefix map, but every model has one too: "
                          "one model without a prefix map gives the output's tensor names")
    return unmapped[0]


def copy_op(out_name: str, view: _ModelView, recipe: Recipe, seed: int) -> TensorOp:
    name = source_name(view, out_name)
    return TensorOp(name=out_name, method=COPY, base=None, models=(SourceRef(view.key, name),),
                    params=(), shape=tuple(view.reader.shape(name)),
                    out_dtype=out_dtype(recipe, view.reader, name), seed=tensor_seed(seed, out_name))


def tokenizer_source(recipe: Recipe, reference: str) -> str:
    """The model whose tokenizer files are copied (a recipe that sets a tokenizer writes a built one instead)."""
    source = recipe.tokenizer_source if recipe.tokenizer is None else recipe.tokenizer.source
    if source in (None, "base", "union"):
        return reference if source is None or recipe.base_model is None else recipe.base_model
    if source not in recipe.source_models():
        raise RecipeError(f"tokenizer_source {source!r} is neither 'base' nor one of the recipe's models")
    return source


def config_updates(recipe: Recipe, config: Mapping[str, Any], ops: list[TensorOp],
                   layers: int | None = None) -> dict[str, Any]:
    updates: dict[str, Any] = {}
    chosen = recipe.out_dtype or recipe.dtype
    if chosen:
        updates["torch_dtype"] = chosen
    if layers is not None and config:
        updates[layer_count_key(config)] = layers
    for op in ops:
        info = describe_tensor(op.name, _architecture(config))
        if info.role == "embed" and ("embed_tokens" in op.name or "wte" in op.name):
            updates[_vocab_key(config)] = op.shape[0]
            break
    return updates


def _vocab_key(config: Mapping[str, Any]) -> str:
    """Where the config holds the vocabulary size: top level, or a VLM's ``text_config``."""
    if "vocab_size" not in config:
        for nested in ("text_config", "language_config", "llm_config"):
            section = config.get(nested)
            if isinstance(section, Mapping) and "vocab_size" in section:
                return f"{nested}.vocab_size"
    return "vocab_size"
