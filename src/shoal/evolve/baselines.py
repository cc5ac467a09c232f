"""The report's comparison rows: the sources themselves and the uniform merge.

"uniform" means one thing everywhere (``shoal evolve``'s report and ``shoal demo``): the
run's method with every model at :data:`UNIFORM_BASELINE` (DARE-TIES: density 0.5, weight 1),
for the parameters the method takes; the others keep their defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from shoal.evolve.config import EvolveConfig
from shoal.evolve.references import MODEL_DIR
from shoal.merge.recipe import ModelEntry, Recipe

UNIFORM_BASELINE: dict[str, float] = {"density": 0.5, "weight": 1.0}


def uniform_values(method: str, values: Mapping[str, float] | None = None) -> dict[str, float]:
    """The per-model values of the uniform merge for ``method``: ``values`` when given, else
    :data:`UNIFORM_BASELINE` restricted to the parameters the method takes."""
    if values is not None:
        return dict(values)
    from shoal.merge.registry import get_method

    taken = {p.name for p in get_method(method).params if p.per_model}
    return {name: value for name, value in UNIFORM_BASELINE.items() if name in taken}


def uniform_recipe(config: EvolveConfig, values: Mapping[str, float] | None = None) -> Recipe:
    """The run's method with every model at the same parameter values."""
    chosen = uniform_values(config.method, values)
    entries = [ModelEntry(model=m, parameters=dict(chosen), prefix_map=config.prefix_maps.get(m, {}))  # type: ignore[arg-type]
               for m in config.models if not (config.base_model and m == config.base_model)]
    base_map = config.prefix_maps.get(config.base_model, {}) if config.base_model else {}
    return Recipe(merge_method=config.method, base_model=config.base_model, models=entries,
                  parameters=dict(config.fixed), seed=config.seed, base_prefix_map=base_map)  # type: ignore[arg-type]


def output_model(config: EvolveConfig) -> str:
    """The model a run's candidates look like (names, config, tokenizer or processor): the base,
    or the first model; with a mapped base, the first model without a prefix map (a VLM)."""
    from shoal.merge.plan import output_reference, prefix_maps

    recipe = uniform_recipe(config)
    return output_reference(recipe, prefix_maps(recipe))


def source_labels(sources: Sequence[str]) -> list[str]:
    """Short, distinct names for the report's rows: a folder's name; a finished run's model
    (``RUN/model``) by its run's name; a name that repeats gets its parent folder's name too."""
    def label(ref: str) -> str:
        path = Path(ref)
        if path.name == MODEL_DIR and path.parent.name:
            return f"{path.parent.name} (run)"
        return path.name or ref

    labels = [label(s) for s in sources]
    repeated = {name for name in labels if labels.count(name) > 1}
    return [f"{Path(ref).parent.name}/{name}" if name in repeated and Path(ref).parent.name else name
            for ref, name in zip(sources, labels)]


def source_rows(sources: Sequence[str]) -> list[tuple[str, Any]]:
    """One report row per source model (the model folder as the row)."""
    return list(zip(source_labels(sources), sources))
