"""What a run's Optuna study tells the tools that read it (``optuna-dashboard``, a notebook).

- the study is named after the run folder (``runs/cross`` -> ``cross``); a study written
  before that (named ``shoal-evolve``) keeps its name, so old runs resume;
- its metric is named (``set_metric_names``): the fitness tasks and split;
- readable gene names: the Optuna parameter names stay the internal gene keys
  (``m0.c1.weight``, ``I3``, ``W0.4``), because renaming them would break the resume of runs
  already on disk (their trials, and CMA-ES's search space, are keyed by them); the study's
  user attribute ``gene_names`` maps each key to a readable name
  (``lang.layer0.weight``, ``slot3.math.layer1``, ``scale.math.layer1->lang.layer0``);
- every trial carries, as user attributes, its decoded parameter values under the readable
  names (``values``) and the candidate itself: the merge recipe (parameter space) or the
  layer path (data-flow space), with ``zoo:`` names where a source came from the zoo.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping

LEGACY_STUDY_NAME = "shoal-evolve"


def study_name(run_dir: Path, existing: Iterable[str] = ()) -> str:
    """The study of ``run_dir``: the folder's name, or the old fixed name when the storage
    holds a study under that name and none under the folder's."""
    name = Path(run_dir).resolve().name or LEGACY_STUDY_NAME
    names = set(existing)
    if name not in names and LEGACY_STUDY_NAME in names:
        return LEGACY_STUDY_NAME
    return name


def run_study_name(storage_url: str, run_dir: Path) -> str:
    """The name of the study of ``run_dir`` in ``storage_url`` (see :func:`study_name`)."""
    import optuna

    from shoal.evolve.search import make_storage

    try:
        existing = [s.study_name for s in optuna.get_all_study_summaries(make_storage(storage_url))]
    except Exception:  # the storage cannot be read: opening the study says why, naming the URL
        existing = []
    return study_name(run_dir, existing)


def metric_name(config: Any) -> str:
    spec = config.fitness
    tasks = spec.tasks if hasattr(spec, "tasks") else [spec.task]
    return f"{'+'.join(tasks)} ({spec.split} split)"


def describe_study(study: Any, evaluator: Any) -> None:
    """Name the study's metric and map its gene keys to readable names."""
    import warnings

    import optuna

    with warnings.catch_warnings():  # experimental in Optuna 3.2-5 and stable in use since
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([metric_name(evaluator.config)])
    study.set_user_attr("gene_names", gene_names(evaluator))


# -- readable names --------------------------------------------------------------------------

def _token(text: str) -> str:
    """A label as one dotted-name part: ``math (run)`` -> ``math_run``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "model"


def _cell_token(cell: Any) -> str:
    group = cell.group.replace(" ", "")  # "layers 0-1" -> "layers0-1", "layer 0" -> "layer0"
    return f"{group}.{cell.module}" if cell.module else group


def gene_names(evaluator: Any) -> dict[str, str]:
    """Gene key -> readable name, for either search space."""
    space = evaluator.space
    if hasattr(space, "genes"):
        return _ps_names(space)
    return _dfs_names(space, evaluator.sources)


def _ps_names(space: Any) -> dict[str, str]:
    from shoal.evolve.baselines import source_labels
    from shoal.evolve.space import GLOBAL

    models = list(dict.fromkeys(g.model for g in space.genes if g.model != GLOBAL))
    labels = dict(zip(models, (_token(label) for label in source_labels(models))))
    labels[GLOBAL] = "all_models"
    return {g.key: f"{labels[g.model]}.{_cell_token(g.cell)}.{g.param}" for g in space.genes}


def _dfs_names(space: Any, sources: list[str]) -> dict[str, str]:
    from shoal.evolve.baselines import source_labels

    labels = [_token(label) for label in source_labels(sources)]

    def layer(index: int) -> str:
        model, number = space.local(index)
        return f"{labels[model]}.layer{number}"

    m = space.num_layers
    names = {f"I{t}": f"slot{t}.{layer(t % m)}" for t in range(space.num_slots)}
    if space.layout.scaling == "matrix":
        names.update({f"W{i}.{j}": f"scale.{layer(i)}->{layer(j)}" for i in range(m) for j in range(m)})
    else:
        names.update({f"S{t}": f"scale.slot{t}.{layer(t % m)}" for t in range(space.num_slots)})
    return names


# -- per-trial attributes --------------------------------------------------------------------

def trial_attrs(evaluator: Any, genome: Mapping[str, float]) -> dict[str, Any]:
    """The decoded candidate of ``genome``: parameter values under readable names and the
    recipe (parameter space) or layer path (data-flow space)."""
    names = _cached_names(evaluator)
    space = evaluator.space
    if hasattr(space, "genes"):
        values = space.values(genome)
        return {"values": {names[k]: round(v, 6) for k, v in values.items()},
                "recipe": portable_recipe(space.decode(genome)).to_yaml()}
    path = space.decode(genome)
    on = set(space.selected_slots(genome))
    values: dict[str, Any] = {names[k]: (int(k[1:]) in on) for k in space.indicator_keys()}
    low, high = space.layout.scale_range
    from shoal.flow.genes import to_range

    values.update({names[k]: round(to_range(float(genome[k]), low, high), 6) for k in space.scale_keys()})
    labels = [portable_reference(s) for s in evaluator.sources]
    return {"values": values, "path": path.describe([Path(s).name for s in evaluator.sources]),
            "hops": path.to_list(), "sources": labels}


def _cached_names(evaluator: Any) -> dict[str, str]:
    names = getattr(evaluator, "_readable_gene_names", None)
    if names is None:
        names = gene_names(evaluator)
        try:
            evaluator._readable_gene_names = names
        except AttributeError:  # pragma: no cover - a frozen evaluator
            pass
    return names


# -- portable source names -------------------------------------------------------------------

def portable_reference(source: str) -> str:
    """``zoo:SIZE/NAME`` (or ``zoo:SIZE@SEED/NAME``) for a model folder of a zoo world, so
    recipes and cards read the same on every machine; any other source unchanged.

    A zoo world's folder holds ``manifest.json`` (its version, size, seed and models). The name
    is used only for a world in the zoo's own cache (``$SHOAL_CACHE/zoo/<size>-seed<seed>-v<N>``,
    else under ``~/.cache/shoal``; the layout of :func:`shoal.zoo.build.default_root`, which
    ``tests/evolve/test_evolve_study.py`` holds this to), where the name resolves back to the
    same folder; a world built elsewhere keeps its path. Nothing is resolved or built here."""
    import json
    import os

    folder = Path(source)
    try:
        manifest = json.loads((folder.parent / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return source
    if not isinstance(manifest, dict) or not isinstance(manifest.get("world_version"), int) \
            or folder.name not in manifest.get("models", ()) \
            or not isinstance(manifest.get("size"), str) or not isinstance(manifest.get("seed"), int):
        return source
    seed = manifest["seed"]
    cache = Path(os.environ["SHOAL_CACHE"]) if os.environ.get("SHOAL_CACHE") else Path.home() / ".cache" / "shoal"
    home = cache / "zoo" / f"{manifest['size']}-seed{seed}-v{manifest['world_version']}"
    try:
        if home.resolve() != folder.parent.resolve():
            return source
    except OSError:
        return source
    return f"zoo:{manifest['size']}/{folder.name}" if seed == 0 else \
        f"zoo:{manifest['size']}@{seed}/{folder.name}"


def portable_recipe(recipe: Any) -> Any:
    """``recipe`` with every zoo model folder written as its ``zoo:`` name."""
    models = [entry.model_copy(update={"model": portable_reference(entry.model)})
              for entry in recipe.models or []]
    base = portable_reference(recipe.base_model) if recipe.base_model else recipe.base_model
    return recipe.model_copy(update={"models": models or recipe.models, "base_model": base})


def local_recipe(recipe: Any) -> Any:
    """The inverse of :func:`portable_recipe`: ``zoo:`` names (any ``SCHEME:`` reference)
    resolved to the folders a run's resident candidate was built from."""
    from shoal.checkpoint.references import resolve_model_ref

    def local(name: str | None) -> str | None:
        return resolve_model_ref(name) if name and ":" in name and not Path(name).exists() else name

    names = [entry.model for entry in recipe.models or []] + [recipe.base_model]
    if not any(name and ":" in name and not Path(name).exists() for name in names):
        return recipe
    models = [entry.model_copy(update={"model": local(entry.model)}) for entry in recipe.models or []]
    return recipe.model_copy(update={"models": models or recipe.models, "base_model": local(recipe.base_model)})
