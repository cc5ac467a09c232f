"""Everything about a run that can be checked before anything is written.

A run that cannot work (a misspelt task, an unknown method or parameter, a model that is not
there, a trial budget of -3) must say so in one line before it creates its run folder, its
config or its study: a failure found only by the trials would cost a failed trial each and
leave a folder that blocks the corrected rerun.
"""

from __future__ import annotations

from pathlib import Path

from shoal.errors import ConfigError, ShoalError
from shoal.evolve.config import EvolveConfig, parse_evolve_config


def check_config(config: EvolveConfig, *, where: str = "config") -> EvolveConfig:
    """``config`` validated again as a whole (a ``model_copy`` skips pydantic's checks), with
    its method, its parameters, its models and its task names checked; nothing is written."""
    config = parse_evolve_config(config.model_dump(mode="json"), where=where)
    if config.kind == "ps":
        _check_method(config)
    folders = _check_models(config)
    seed = _task_seed(config, folders)
    _check_tasks(config, seed)
    return config


def _check_method(config: EvolveConfig) -> None:
    from shoal.merge.registry import get_method

    try:
        method = get_method(config.method)
    except ShoalError as err:
        raise ConfigError(f"method: {err}") from None
    params = {p.name: p for p in method.params}
    for name, value in config.fixed.items():
        if name not in params:
            raise ConfigError(f"fixed: method {method.name!r} has no parameter {name!r} "
                              f"(it takes: {', '.join(sorted(params))})")
        kind = params[name].kind
        if (kind == "bool") != isinstance(value, bool):
            raise ConfigError(f"fixed.{name}: {method.name!r} takes a {'true/false' if kind == 'bool' else 'number'}"
                              f" for {name!r}, got {value!r}")
    wanted = config.space.parameters
    if wanted is not None:
        unknown = [p for p in wanted if p not in params]
        if unknown:
            raise ConfigError(f"space.parameters: method {method.name!r} has no parameter(s) {unknown} "
                              f"(it takes: {', '.join(sorted(params))})")
        not_float = [p for p in wanted if not params[p].evolvable]
        if not_float:
            raise ConfigError(f"space.parameters: {not_float} cannot evolve (only numeric parameters with "
                              "a range do)")
    for name in config.space.ranges:
        if name not in params:
            raise ConfigError(f"space.ranges: method {method.name!r} has no parameter {name!r}")
    if method.needs_base and config.base_model is None:
        raise ConfigError(f"method {method.name!r} needs base_model")


def _check_models(config: EvolveConfig) -> list[str]:
    """The local folders of the models (recipe sources are parsed, and merged later)."""
    from shoal.checkpoint.references import resolve_model_ref

    refs = ([("base_model", config.base_model)] if config.base_model else []) + \
        [(f"models[{i}]", m) for i, m in enumerate(config.models)]
    folders = []
    for key, ref in refs:
        if ref.endswith((".yaml", ".yml")) and Path(ref).is_file():
            from shoal.merge.recipe import load_recipe

            try:
                load_recipe(ref)
            except ShoalError as err:
                raise ConfigError(f"{key}: {err}") from None
            continue
        try:
            folders.append(resolve_model_ref(ref))
        except ShoalError as err:
            raise ConfigError(f"{key}: {err}") from None
    return folders


def _task_seed(config: EvolveConfig, folders: list[str]) -> int:
    if config.task_seed is not None:
        return config.task_seed
    from shoal.eval.registry import task_seed_of_models

    try:
        seed = task_seed_of_models(folders)
    except ShoalError as err:
        raise ConfigError(str(err)) from None
    return 0 if seed is None else seed


def _check_tasks(config: EvolveConfig, seed: int) -> None:
    from shoal.eval.registry import get_task

    specs = [("fitness.task", config.fitness.tasks)]
    if config.validation is not None:
        specs.append(("validation.task", config.validation.tasks))
    specs.append(("report.tasks", config.report.tasks))
    for key, names in specs:
        for name in names:
            try:
                get_task(name, seed=seed)
            except ShoalError as err:
                raise ConfigError(f"{key}: {err}") from None
