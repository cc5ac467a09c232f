"""Recipe parameters checked against a method and resolved per tensor, and what a recipe's mode changes.

A key a method takes is resolved for every tensor (:func:`resolve_params`). A key the method
does not take is, as in mergekit (which resolves only the parameters a method declares and
ignores the rest):

- accepted without a word when it changes nothing in shoal either
  (:data:`~shoal.merge.registry.NO_EFFECT_PARAMETERS`, e.g. ``int8_mask``);
- accepted with one warning when it is a parameter of some other method (``weight`` on
  ``slerp``): it has no effect here;
- an error naming it otherwise: a key no method knows is a typo.
"""

from __future__ import annotations

from typing import Any, Mapping

from shoal.errors import RecipeError
from shoal.merge.params import TensorPosition, is_unset, resolve_first
from shoal.merge.recipe import ParamValue, Recipe
from shoal.merge.registry import NO_EFFECT_PARAMETERS, PARAMETERS, MethodSpec

_UNIT_RANGE = {"density", "t", "gamma", "epsilon"}


def _param_groups(recipe: Recipe) -> list[tuple[Mapping[str, ParamValue], str, bool]]:
    """Every parameter mapping of the recipe: (mapping, where, whether it belongs to one model)."""
    groups: list[tuple[Mapping[str, ParamValue], str, bool]] = [(recipe.parameters, "parameters", False)]
    for i, entry in enumerate(recipe.models or []):
        groups.append((entry.parameters, f"models[{i}] ({entry.model}).parameters", True))
    for i, sl in enumerate(recipe.slices or []):
        groups.append((sl.parameters, f"slices[{i}].parameters", False))
        for j, src in enumerate(sl.sources):
            groups.append((src.parameters, f"slices[{i}].sources[{j}] ({src.model}).parameters", True))
    return groups


def _is_false(value: ParamValue) -> bool:
    """Whether a setting is ``false`` for every tensor (a plain false, or filters whose values all are)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, list) and value and all(hasattr(v, "value") for v in value):
        return all(_is_false(v.value) for v in value)  # type: ignore[union-attr]
    return False


def check_parameter_names(recipe: Recipe, method: MethodSpec) -> list[str]:
    """Refuse keys no method knows; return one warning per key the method ignores (mergekit ignores it too)."""
    known = {p.name: p for p in method.params}
    ignored: dict[str, None] = {}
    for params, where, per_model_only in _param_groups(recipe):
        for key, value in params.items():
            if key in known:
                if per_model_only and not known[key].per_model:
                    raise RecipeError(f"{where}: parameter {key!r} of {method.name!r} applies to the whole "
                                      "merge; set it under the top-level 'parameters'")
                continue
            no_effect = NO_EFFECT_PARAMETERS.get(key, {})
            if method.name in no_effect:
                if no_effect[method.name] or _is_false(value):
                    continue
                raise RecipeError(f"{where}: parameter {key!r}: only false is supported for method "
                                  f"{method.name!r} (mergekit's true changes the result, shoal's "
                                  f"{method.name} does not implement it)")
            if key not in PARAMETERS and key not in NO_EFFECT_PARAMETERS:
                allowed = ", ".join(known) or "none"
                raise RecipeError(f"{where}: unknown parameter {key!r} for method {method.name!r} "
                                  f"(it takes: {allowed})")
            ignored[key] = None
    return [f"parameter {key!r} has no effect on method {method.name!r} (mergekit accepts and ignores it too)"
            for key in ignored]


def check_range(name: str, value: Any, tensor: str) -> None:
    if name in _UNIT_RANGE and isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise RecipeError(f"parameter {name!r} must lie in [0, 1], got {value} (tensor {tensor})")


def resolve_params(method: MethodSpec, position: TensorPosition, model_params: list[Mapping[str, ParamValue]],
                   global_params: list[Mapping[str, ParamValue]], compat: str) -> tuple[tuple[str, Any], ...]:
    """The method's parameters for one tensor: most specific setting first, else the mode's default."""
    resolved: list[tuple[str, Any]] = []
    for spec in method.params:
        default = spec.default_for(compat)
        if spec.per_model:
            values = []
            for params in model_params:
                value = resolve_first([params.get(spec.name)] + [g.get(spec.name) for g in global_params],
                                      position)
                value = default if is_unset(value) else value
                check_range(spec.name, value, position.name)
                values.append(value)
            resolved.append((spec.name, tuple(values)))
        else:
            value = resolve_first([g.get(spec.name) for g in global_params], position)
            if is_unset(value):
                resolved.append((spec.name, default))  # None: the method picks
                continue
            if spec.kind == "bool" and not isinstance(value, bool):
                raise RecipeError(f"parameter {spec.name!r} must be true or false, got {value!r}")
            check_range(spec.name, value, position.name)
            resolved.append((spec.name, value))
    return tuple(resolved)


def check_model_count(method: MethodSpec, count: int, where: str) -> None:
    if count < method.min_models:
        raise RecipeError(f"{where}: method {method.name!r} needs at least {method.min_models} "
                          f"model{'s' if method.min_models > 1 else ''} besides the base, got {count}")
    if method.max_models is not None and count > method.max_models:
        raise RecipeError(f"{where}: method {method.name!r} takes at most {method.max_models} "
                          f"model{'s' if method.max_models > 1 else ''} besides the base, got {count}")
