"""The data-flow-space rows of the claims benchmark (:mod:`shoal.studies.claims`).

- ``dfs evolved``: DFS over math (model A) + lang, ``examples/evolve_dfs.yaml``'s search; with
  ``dfs_search="own_layers_first"`` the two-stage ``search.own_layers_first`` (half the trials
  over math's own layers, the control's search, then CMA-ES over every gene from its best).
- ``dfs control: math's own layers``: DFS over the math specialist alone, one stage, the same
  budget.
- ``dfs evolved, lang slots off``: the evolved pick with every lang indicator gene off (its W
  unchanged), a point of the control's space: what the lang layers add to the path found, and
  ``dfs evolved, lang hops dropped``: the pick's path without its lang hops, every other hop's
  scale kept.
- ``ps+dfs``: DFS over the PS result (model A) + math.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from shoal.errors import ConfigError
from shoal.evolve.config import EvolveConfig, parse_evolve_config
from shoal.evolve.saving import BEST_RECIPE
from shoal.studies.evolve_demo import CROSS_TASK, LANGUAGE_SPECIALIST

DFS_SEARCHES = ("single", "own_layers_first")


def dfs_config(models: Sequence[str], world_seed: int, *, trials: int, limit: int | None,
               scaling: str | None = None, search: str = "single") -> EvolveConfig:
    """``examples/evolve_dfs.yaml``'s search (r = 3, at most 12 hops, scales in [0, 2]) over
    ``models``, on the world's own splits; ``scaling`` None: the config's default; ``search``
    ``own_layers_first``: half the trials over the first model's own layers first."""
    if search not in DFS_SEARCHES:
        raise ConfigError(f"unknown DFS search {search!r}; choose from {', '.join(DFS_SEARCHES)}")
    dfs: dict[str, Any] = {"repeats": 3, "max_hops": 12, "scale_range": [0.0, 2.0]}
    if scaling is not None:
        dfs["scaling"] = scaling
    spec: dict[str, Any] = {"sampler": "cmaes", "trials": trials, "seed": world_seed}
    if search == "own_layers_first":
        spec["own_layers_first"] = {}
    return parse_evolve_config({
        "kind": "dfs", "models": list(models), "dfs": dfs,
        "fitness": {"task": CROSS_TASK, "split": "fitness", "limit": limit},
        "validation": {"task": CROSS_TASK, "split": "validation", "limit": limit, "top_k": 5},
        "report": {"tasks": [CROSS_TASK], "split": "test"},
        "search": spec, "seed": world_seed, "task_seed": world_seed,
    }, where="claims dfs config")


def lang_slots_off(space: Any, genome: dict[str, float]) -> dict[str, float]:
    """``genome`` with every slot of a model other than model A off (scales unchanged)."""
    first = space.layout.layer_counts[0]
    off = 0.5 - space.layout.init_margin
    return {k: (min(v, off) if k.startswith("I") and int(k[1:]) % space.num_layers >= first else v)
            for k, v in genome.items()}


def without_other_models(path: Any) -> Any:
    """``path`` without the hops of models other than model A, every other hop as it was."""
    from shoal.flow.path import LayerPath

    return LayerPath(tuple(h for h in path if h.model == 0))


def _test_scores(evaluator: Any, row: Any) -> list[float]:
    return list(evaluator.score_row(row, CROSS_TASK, "test", None).scores)


def _path_scores(evaluator: Any, path: Any) -> list[float]:
    evaluator.model.set_path(path)
    return list(evaluator.score(evaluator.model, evaluator.tokenizer, CROSS_TASK, "test", None).scores)


def dfs_search_row(run: Any, name: str, folder: str, models: Sequence[str], *, search: str = "single",
                   ablations: bool = False) -> None:
    """Run (or resume) one DFS search into ``run.out/<folder>-<scaling>[-own-layers-first]`` and score
    its pick on test (with ``ablations``: also the pick without its other models' layers)."""
    from shoal.evolve.evaluators import DfsEvaluator
    from shoal.evolve.run import evolve, resolve_config

    config = dfs_config(models, run.world.seed, trials=run.trials, limit=run.limit, scaling=run.dfs_scaling,
                        search=search)
    folder = f"{folder}-{config.dfs.scaling}"  # both scalings may be run into one DIR, one at a time
    if search != "single":
        folder += "-own-layers-first"
    result = evolve(config, run.out / folder, resume=True, write_model=False, report=False,
                    progress=run.stage(name))
    evaluator = DfsEvaluator(resolve_config(config, run.out / folder))
    try:
        path = evaluator.space.decode(result.genome)
        other = sum(h.model != 0 for h in path)
        run.searched(name, result.best_fitness, result.best_validation, result.trials,
                     scaling=config.dfs.scaling, search=search, path=result.description,
                     hops=len(path), other_model_hops=other)
        key = json.dumps([sorted(result.genome.items()), config.dfs.scaling, list(models)])
        note = f"{config.dfs.scaling} scaling" + (", own layers first" if search != "single" else "")
        run.row(name, key, lambda: (_test_scores(evaluator, dict(result.genome)), note))
        if ablations:
            off = lang_slots_off(evaluator.space, dict(result.genome))
            run.row(f"{name}, lang slots off", json.dumps(sorted(off.items())) + key,
                    lambda: (_test_scores(evaluator, off), f"{other} of {len(path)} hops lang; W kept"))
            dropped = without_other_models(path)
            run.row(f"{name}, lang hops dropped", json.dumps([[h.model, h.layer, h.scale] for h in dropped]) + key,
                    lambda: (_path_scores(evaluator, dropped), "other hops' scales kept"))
    finally:
        evaluator.close()


def dfs_rows(run: Any, math_path: str, search: str = "single") -> None:
    lang_path = str(run.world.model(LANGUAGE_SPECIALIST))
    dfs_search_row(run, "dfs evolved", "dfs-evolved", [math_path, lang_path], search=search, ablations=True)
    dfs_search_row(run, "dfs control: math's own layers", "dfs-control-math", [math_path])


def psdfs_row(run: Any, math_path: str) -> None:
    recipe = run.out / "ps-evolved" / BEST_RECIPE
    dfs_search_row(run, "ps+dfs", "psdfs", [str(Path(recipe)), math_path])
