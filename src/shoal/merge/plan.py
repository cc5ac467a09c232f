"""Turn a recipe into a merge plan: one operation per output tensor, no tensor data read.

Planning reads only headers (names, shapes, dtypes) and configs, so every problem a user can
cause — a missing tensor, mismatched shapes, an unknown parameter, a bad layer range — is found
before the first byte of output is written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from shoal.checkpoint import CheckpointReader, describe_tensor, layer_count_key, num_layers, with_layer
from shoal.errors import MergeError, RecipeError
from shoal.merge.model_view import ModelView as _ModelView
from shoal.merge.model_view import architecture as _architecture
from shoal.merge.model_view import count_layers as _count_layers
from shoal.merge.params import TensorPosition, is_unset, resolve_first
from shoal.merge.recipe import ParamValue, Recipe
from shoal.merge.registry import MethodSpec, get_method, python_name
from shoal.merge.source_checks import check_floating_sources, check_layer_counts, check_parameter_kinds

COPY = "copy"

_UNIT_RANGE = {"density", "t", "gamma", "epsilon"}

DTYPE_BY_NAME = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SourceRef:
    """One tensor of one source model."""

    model: str  # the model as named in the recipe
    tensor: str  # the tensor's name inside that model's checkpoint


@dataclass(frozen=True)
class TensorOp:
    """How to produce one output tensor."""

    name: str
    method: str  # a registered merge method, or ``copy``
    base: SourceRef | None
    models: tuple[SourceRef, ...]
    params: tuple[tuple[str, Any], ...]  # per-model parameters as tuples, in ``models`` order
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    seed: int

    @property
    def sources(self) -> tuple[SourceRef, ...]:
        return ((self.base,) if self.base is not None else ()) + self.models

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.tensor([], dtype=self.out_dtype).element_size()

    def kwargs(self) -> dict[str, Any]:
        return {python_name(k): (list(v) if isinstance(v, tuple) else v) for k, v in self.params}

    @classmethod
    def copy(cls, name: str, source: SourceRef, shape: tuple[int, ...], dtype: torch.dtype) -> "TensorOp":
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

    @property
    def total_bytes(self) -> int:
        return sum(op.nbytes for op in self.ops)

    def models_used(self) -> list[str]:
        return list(dict.fromkeys(ref.model for op in self.ops for ref in op.sources))


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that does not depend on the order tensors are processed in."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _check_parameter_names(recipe: Recipe, method: MethodSpec) -> None:
    known = {p.name: p for p in method.params}

    def check(params: Mapping[str, ParamValue], where: str, per_model_only: bool) -> None:
        for key in params:
            if key not in known:
                allowed = ", ".join(known) or "none"
                raise RecipeError(f"{where}: unknown parameter {key!r} for method {method.name!r} "
                                  f"(it takes: {allowed})")
            if per_model_only and not known[key].per_model:
                raise RecipeError(f"{where}: parameter {key!r} of {method.name!r} applies to the whole "
                                  "merge; set it under the top-level 'parameters'")

    check(recipe.parameters, "parameters", False)
    for i, entry in enumerate(recipe.models or []):
        check(entry.parameters, f"models[{i}] ({entry.model}).parameters", True)
    for i, sl in enumerate(recipe.slices or []):
        check(sl.parameters, f"slices[{i}].parameters", False)
        for j, src in enumerate(sl.sources):
            check(src.parameters, f"slices[{i}].sources[{j}] ({src.model}).parameters", True)


def _check_range(name: str, value: Any, tensor: str) -> None:
    if name in _UNIT_RANGE and isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise RecipeError(f"parameter {name!r} must lie in [0, 1], got {value} (tensor {tensor})")


def _resolve_params(method: MethodSpec, position: TensorPosition,
                    model_params: list[Mapping[str, ParamValue]],
                    global_params: list[Mapping[str, ParamValue]]) -> tuple[tuple[str, Any], ...]:
    resolved: list[tuple[str, Any]] = []
    for spec in method.params:
        if spec.per_model:
            values = []
            for params in model_params:
                value = resolve_first([params.get(spec.name)] + [g.get(spec.name) for g in global_params],
                                      position)
                value = spec.default if is_unset(value) else value
                _check_range(spec.name, value, position.name)
                values.append(value)
            resolved.append((spec.name, tuple(values)))
        else:
            value = resolve_first([g.get(spec.name) for g in global_params], position)
            if is_unset(value):
                resolved.append((spec.name, spec.default))  # None: the method picks
                continue
            if spec.kind == "bool" and not isinstance(value, bool):
                raise RecipeError(f"parameter {spec.name!r} must be true or false, got {value!r}")
            _check_range(spec.name, value, position.name)
            resolved.append((spec.name, value))
    return tuple(resolved)


def _check_model_count(method: MethodSpec, count: int, where: str) -> None:
    if count < method.min_models:
        raise RecipeError(f"{where}: method {method.name!r} needs at least {method.min_models} "
                          f"model{'s' if method.min_models > 1 else ''} besides the base, got {count}")
    if method.max_models is not None and count > method.max_models:
        raise RecipeError(f"{where}: method {method.name!r} takes at most {method.max_models} "
                          f"model{'s' if method.max_models > 1 else ''} besides the base, got {count}")


def plan_merge(recipe: Recipe, readers: Mapping[str, CheckpointReader], *, seed: int = 0) -> MergePlan:
    """Plan ``recipe`` over opened checkpoints (``readers`` keyed by the names the recipe uses)."""
    method = get_method(recipe.merge_method)
    _check_parameter_names(recipe, method)
    if method.needs_base and recipe.base_model is None:
        raise RecipeError(f"method {method.name!r} needs 'base_model'")
    for name in recipe.source_models():
        if name not in readers:
            raise RecipeError(f"model {name!r} was not opened")
    seed = recipe.seed if recipe.seed is not None else seed
    check_parameter_kinds(recipe, method)
    check_layer_counts(recipe, readers)
    plan = (_plan_models if recipe.models is not None else _plan_slices)(recipe, method, readers, seed)
    check_floating_sources(plan.ops, readers, COPY)
    return plan


def _prefix_maps(recipe: Recipe) -> dict[str, dict[str, str]]:
    maps: dict[str, dict[str, str]] = {}
    entries = list(recipe.models or []) + [s for sl in recipe.slices or [] for s in sl.sources]
    for entry in entries:
        if entry.prefix_map:
            if entry.model in maps and maps[entry.model] != entry.prefix_map:
                raise RecipeError(f"model {entry.model!r} is given two different prefix maps")
            maps[entry.model] = dict(entry.prefix_map)
    if recipe.base_model is not None and recipe.base_prefix_map:
        maps[recipe.base_model] = dict(recipe.base_prefix_map)
    return maps


def _out_dtype(recipe: Recipe, reader: CheckpointReader, name: str) -> torch.dtype:
    chosen = recipe.out_dtype or recipe.dtype
    return DTYPE_BY_NAME[chosen] if chosen else reader.dtype(name)


def _check_shapes(out_name: str, refs: list[tuple[_ModelView, str]]) -> tuple[int, ...]:
    first_view, first_name = refs[0]
    shape = first_view.reader.shape(first_name)
    for view, name in refs[1:]:
        other = view.reader.shape(name)
        if other != shape:
            raise MergeError(f"shape mismatch for tensor {out_name!r}: {first_view.key} has "
                             f"{list(shape)}, {view.key} has {list(other)} (tensor {name!r})")
    return tuple(shape)


def _source(view: _ModelView, out_name: str) -> str:
    name = view.source_name(out_name)
    if name is None:
        raise MergeError(f"tensor {out_name!r} is missing from model {view.key}")
    return name


def _plan_models(recipe: Recipe, method: MethodSpec, readers: Mapping[str, CheckpointReader],
                 seed: int) -> MergePlan:
    assert recipe.models is not None
    maps = _prefix_maps(recipe)
    views = {key: _ModelView(key, readers[key], maps.get(key, {})) for key in recipe.source_models()}
    base_key = recipe.base_model
    entries = [m for m in recipe.models if not (method.needs_base and m.model == base_key)]
    _check_model_count(method, len(entries), "models")
    reference = base_key if base_key is not None else recipe.models[0].model
    ref_view = views[reference]
    config = readers[reference].config or {}
    total_layers = num_layers(config) if config else _count_layers(ref_view)

    ops: list[TensorOp] = []
    for out_name in ref_view.to_source:
        info = describe_tensor(out_name, ref_view.architecture)
        position = TensorPosition(out_name, info.layer, total_layers,
                                  after_stack=info.layer is None and info.role != "embed")
        covering = [e for e in entries if views[e.model].covers(out_name)]
        base_ref = None
        if method.needs_base:
            base_ref = SourceRef(reference, _source(ref_view, out_name))
        refs = [(views[e.model], _source(views[e.model], out_name)) for e in covering]
        shape_refs = ([(ref_view, base_ref.tensor)] if base_ref else []) + refs
        if len(covering) < len(entries) or not covering:
            # Outside some model's prefix map (e.g. a vision tower): the reference's own tensor.
            ops.append(_copy_op(out_name, ref_view, recipe, seed))
            continue
        shape = _check_shapes(out_name, shape_refs)
        params = _resolve_params(method, position, [e.parameters for e in covering], [recipe.parameters])
        ops.append(TensorOp(
            name=out_name, method=method.name, base=base_ref,
            models=tuple(SourceRef(view.key, name) for view, name in refs), params=params,
            shape=shape, out_dtype=_out_dtype(recipe, ref_view.reader, ref_view.to_source[out_name]),
            seed=tensor_seed(seed, out_name)))
    return MergePlan(recipe=recipe, method=method.name, ops=tuple(ops), reference=reference,
                     tokenizer_source=_tokenizer_source(recipe, reference),
                     config_updates=_config_updates(recipe, config, ops))


def _copy_op(out_name: str, view: _ModelView, recipe: Recipe, seed: int) -> TensorOp:
    name = _source(view, out_name)
    return TensorOp(name=out_name, method=COPY, base=None, models=(SourceRef(view.key, name),),
                    params=(), shape=tuple(view.reader.shape(name)),
                    out_dtype=_out_dtype(recipe, view.reader, name), seed=tensor_seed(seed, out_name))


def _tokenizer_source(recipe: Recipe, reference: str) -> str:
    source = recipe.tokenizer_source
    if source is None or source == "base":
        return reference if source is None or recipe.base_model is None else recipe.base_model
    if source not in recipe.source_models():
        raise RecipeError(f"tokenizer_source {source!r} is neither 'base' nor one of the recipe's models")
    return source


def _config_updates(recipe: Recipe, config: Mapping[str, Any], ops: list[TensorOp],
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
            updates["vocab_size"] = op.shape[0]
            break
    return updates


def _plan_slices(recipe: Recipe, method: MethodSpec, readers: Mapping[str, CheckpointReader],
                 seed: int) -> MergePlan:
    assert recipe.slices is not None
    maps = _prefix_maps(recipe)
    views = {key: _ModelView(key, readers[key], maps.get(key, {})) for key in recipe.source_models()}
    first = recipe.slices[0].sources[0].model
    reference = recipe.base_model if recipe.base_model is not None else first
    ref_view = views[reference]
    config = readers[reference].config or {}

    for i, sl in enumerate(recipe.slices):
        for j, src in enumerate(sl.sources):
            available = num_layers(readers[src.model].config or {}) if readers[src.model].config \
                else _count_layers(views[src.model])
            if src.layer_range[1] > available:
                raise RecipeError(f"slices[{i}].sources[{j}]: layer_range {list(src.layer_range)} "
                                  f"exceeds the {available} layers of {src.model}")

    layer_templates: dict[str, list[str]] = {}  # model -> its layer-0-relative tensor names
    for key, view in views.items():
        layer_templates[key] = [n for n in view.to_source
                                if describe_tensor(n, view.architecture).layer is not None]

    ops: list[TensorOp] = []
    out_layer = 0
    layer_ops: list[TensorOp] = []
    for i, sl in enumerate(recipe.slices):
        length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        base_src = None
        others = list(sl.sources)
        if method.needs_base:
            base_src = next((s for s in sl.sources if s.model == recipe.base_model), None)
            if base_src is None:
                raise RecipeError(f"slices[{i}]: method {method.name!r} needs the base model "
                                  f"{recipe.base_model!r} among the slice's sources")
            others = [s for s in sl.sources if s is not base_src]
        _check_model_count(method, len(others), f"slices[{i}]")
        lead = sl.sources[0]
        lead_view = views[lead.model]
        for offset in range(length):
            lead_layer = lead.layer_range[0] + offset
            templates = [n for n in layer_templates[lead.model]
                         if describe_tensor(n, lead_view.architecture).layer == lead_layer]
            for template in templates:
                out_name = with_layer(template, out_layer)
                position = TensorPosition(out_name, offset, length)

                def ref_for(src: Any) -> tuple[_ModelView, str]:
                    view = views[src.model]
                    wanted = with_layer(template, src.layer_range[0] + offset)
                    return view, _source(view, wanted)

                refs = [ref_for(s) for s in others]
                base_ref = ref_for(base_src) if base_src is not None else None
                shape = _check_shapes(out_name, ([base_ref] if base_ref else []) + refs)
                params = _resolve_params(method, position, [s.parameters for s in others],
                                         [sl.parameters, recipe.parameters])
                layer_ops.append(TensorOp(
                    name=out_name, method=method.name,
                    base=SourceRef(base_ref[0].key, base_ref[1]) if base_ref else None,
                    models=tuple(SourceRef(v.key, n) for v, n in refs), params=params, shape=shape,
                    out_dtype=_out_dtype(recipe, refs[0][0].reader, refs[0][1]) if refs
                    else _out_dtype(recipe, base_ref[0].reader, base_ref[1]),  # type: ignore[index]
                    seed=tensor_seed(seed, out_name)))
            out_layer += 1

    # Tensors outside the decoder stack (embeddings, final norm, lm_head): copied from the
    # reference for layer stacking, merged across the first slice's sources otherwise.
    first_slice = recipe.slices[0]
    inserted = False
    for out_name in ref_view.to_source:
        info = describe_tensor(out_name, ref_view.architecture)
        if info.layer is not None:
            if not inserted:
                ops.extend(layer_ops)
                inserted = True
            continue
        if method.name == "passthrough":
            ops.append(_copy_op(out_name, ref_view, recipe, seed))
            continue
        position = TensorPosition(out_name, None, 1, after_stack=info.role != "embed")
        base_src = next((s for s in first_slice.sources if s.model == recipe.base_model), None) \
            if method.needs_base else None
        others = [s for s in first_slice.sources if s is not base_src]
        refs = [(views[s.model], _source(views[s.model], out_name)) for s in others]
        base_ref = (views[base_src.model], _source(views[base_src.model], out_name)) if base_src else None
        shape = _check_shapes(out_name, ([base_ref] if base_ref else []) + refs)
        ops.append(TensorOp(
            name=out_name, method=method.name,
            base=SourceRef(base_ref[0].key, base_ref[1]) if base_ref else None,
            models=tuple(SourceRef(v.key, n) for v, n in refs),
            params=_resolve_params(method, position, [s.parameters for s in others],
                                   [first_slice.parameters, recipe.parameters]),
            shape=shape, out_dtype=_out_dtype(recipe, ref_view.reader, ref_view.to_source[out_name]),
            seed=tensor_seed(seed, out_name)))
    if not inserted:
        ops.extend(layer_ops)
    return MergePlan(recipe=recipe, method=method.name, ops=tuple(ops), reference=reference,
                     tokenizer_source=_tokenizer_source(recipe, reference),
                     config_updates=_config_updates(recipe, config, ops, layers=out_layer))
