"""Plan mergekit's ``modules:`` recipes: each module of a multi-module model planned on its own.

A multi-module model (a vision-language model: ``text_decoder``, ``vision_tower``,
``multi_modal_projector``; :data:`shoal.checkpoint.architecture.FAMILIES` says which tensor
prefixes each holds) may merge each module with its own models or slices and parameters. As
in mergekit 0.1.5, a single-module model has one module, ``default``, holding every tensor;
a module's ``parameters`` come before the recipe's (where a module's filter list matches no
tensor, the recipe's value applies); and a module the recipe does not list is not written
(a warning says so). Each module becomes an ordinary ``models`` or ``slices`` recipe, planned
by the same planner; its ops are those of the module's tensors. Module entries may carry
``prefix_map``, so the language model of a VLM can merge with a plain LLM while the vision
tower is one model's copy.
"""

from __future__ import annotations

from typing import Any, Mapping

from shoal.checkpoint import CheckpointReader, module_of
from shoal.checkpoint.architecture import family_of
from shoal.errors import RecipeError
from shoal.merge.model_view import architecture
from shoal.merge.recipe import FilterValue, Module, Recipe

DEFAULT = "default"
# the modules whose decoder layers ``slices`` may cut (the others have no layers shoal numbers)
_LAYERED = (DEFAULT, "text_decoder")


def _layer_params(module: Mapping[str, Any], outer: Mapping[str, Any]) -> dict[str, Any]:
    """``module``'s parameters over ``outer``'s, key by key; a filter list of the module falls
    through to the outer value for tensors it does not match (mergekit's precedence)."""
    merged = dict(outer)
    for key, value in module.items():
        below = outer.get(key)
        if (isinstance(value, list) and value and isinstance(value[0], FilterValue)
                and not any(e.filter in (None, "*") for e in value) and below is not None):
            tail = below if isinstance(below, list) and below and isinstance(below[0], FilterValue) \
                else [FilterValue(filter=None, value=below)]
            merged[key] = [*value, *tail]
        else:
            merged[key] = value
    return merged


def known_modules(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The module names of a model with this config: its family's, or ``default``."""
    family = family_of(architecture(config))
    return tuple(name for name, _ in family.modules) if family is not None and family.modules else (DEFAULT,)


def module_recipe(recipe: Recipe, module: Module) -> Recipe:
    """One module of a ``modules:`` recipe as a ``models`` or ``slices`` recipe."""
    return recipe.model_copy(update={"modules": None, "models": module.models, "slices": module.slices,
                                     "parameters": _layer_params(module.parameters, recipe.parameters)})


def plan_modules(recipe: Recipe, readers: Mapping[str, CheckpointReader], *, seed: int):  # type: ignore[no-untyped-def]
    """The plan of a ``modules:`` recipe: each module's ops from its own plan, in the reference's order."""
    from shoal.merge.plan import MergePlan, plan_merge

    assert recipe.modules is not None
    plans = {}
    for name, module in recipe.modules.items():
        if module.slices is not None and name not in _LAYERED:
            raise RecipeError(f"modules.{name}.slices: layer slices cut the language model's decoder layers; "
                              f"give module {name!r} 'models'")
        plans[name] = plan_merge(module_recipe(recipe, module), readers, seed=seed)
    # the output's config and support files: the first module's reference (the base model, or
    # that module's first model: mergekit's rule), whose tensor names every module shares
    reference = next(iter(plans.values())).reference
    config = readers[reference].config or {}
    known = known_modules(config)
    unknown = [name for name in recipe.modules if name not in known]
    if unknown:
        raise RecipeError(f"modules: {reference} has no module {unknown[0]!r} (it has: {', '.join(known)})")
    arch = architecture(config)
    ops = []
    for name, plan in plans.items():
        ops.extend(op for op in plan.ops if name == DEFAULT or module_of(op.name, arch) == name)
    warnings = [w for plan in plans.values() for w in plan.warnings]
    left_out = [name for name in known if name not in recipe.modules]
    if left_out:
        warnings.append(f"modules: {', '.join(left_out)} not listed, so the output has none of "
                        f"{'its' if len(left_out) == 1 else 'their'} tensors (as in mergekit); list "
                        f"{'it' if len(left_out) == 1 else 'them'} with one model to copy")
    updates: dict[str, Any] = {}
    for plan in plans.values():
        updates.update(plan.config_updates)
    first = next(iter(plans.values()))
    return MergePlan(recipe=recipe, method=first.method, ops=tuple(ops), reference=reference,
                     tokenizer_source=first.tokenizer_source, config_updates=updates,
                     warnings=tuple(dict.fromkeys(warnings)))
