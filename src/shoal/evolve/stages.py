"""Coarse-to-fine search (``search.warm_start``): a uniform merge per source first, then per layer.

Stage 1 ("warm start") spends ``warm_start.trials`` of the budget on one gene per model and
parameter (``m0.weight``, ``m1.density``, ...): every layer of a source shares its values, so
the stage covers the single-source merges (a source's weight gene near 0) and the uniform
ones. Each coarse genome is evaluated as the per-layer genome it stands for (every cell takes
its model's value), so both stages score the same candidates on the same fitness split.

Stage 2 is the per-layer CMA-ES over every gene for the rest of the budget, with its mean at
the best coarse point mapped into per-layer genes and step ``warm_start.sigma0``. That point is
the stage's first trial (Optuna's CMA-ES samples its first trial at random otherwise), so the
run's final candidate is never worse on fitness than the best coarse one.

Stage 1 is its own Optuna study, ``<study>.warm-start``, in the run's storage; stage 2 is the
run's study. ``warm_start.json`` in the run folder records the point stage 2 started from. A
killed run resumes into the right stage: stage 1 runs until it holds its trials, and stage 2
starts from the same point (the best coarse trial, lowest number on ties).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from shoal.errors import ConfigError
from shoal.evolve.config import EvolveConfig, SearchSpec
from shoal.evolve.search import finished_trials, make_sampler, open_study, run_trials
from shoal.evolve.workers import Evaluations, Outcome
from shoal.progress import ProgressFn, no_progress

WARM_START_FILE = "warm_start.json"
STAGE_SUFFIX = ".warm-start"


def coarse_key(fine_key: str) -> str:
    """``m0.c3.weight`` -> ``m0.weight``: the coarse gene a per-layer gene takes its value from."""
    parts = fine_key.split(".")
    if len(parts) != 3 or not parts[1].startswith("c"):
        raise ConfigError(f"gene {fine_key!r} is not a per-cell parameter-space gene")
    return f"{parts[0]}.{parts[2]}"


def coarse_keys(fine_keys: list[str]) -> list[str]:
    return list(dict.fromkeys(coarse_key(k) for k in fine_keys))


def expand(coarse: Mapping[str, float], fine_keys: list[str]) -> dict[str, float]:
    """The per-layer genome of a coarse one: every cell takes its model's value."""
    return {key: float(coarse[coarse_key(key)]) for key in fine_keys}


class _Expanding:
    """Evaluations of coarse genomes as the per-layer genomes they stand for."""

    def __init__(self, inner: Evaluations, fine_keys: list[str]):
        self.inner = inner
        self.fine_keys = fine_keys
        self.capacity = inner.capacity

    def submit(self, key: int, genome: dict[str, float]) -> None:
        self.inner.submit(key, expand(genome, self.fine_keys))

    def collect(self) -> list[Outcome]:
        return self.inner.collect()

    def close(self) -> None:  # the caller closes the inner evaluations
        pass


def coarse_spec(search: SearchSpec) -> SearchSpec:
    assert search.warm_start is not None
    ws = search.warm_start
    return SearchSpec(sampler=ws.sampler, trials=ws.trials, seed=search.seed)


def fine_spec(search: SearchSpec) -> SearchSpec:
    assert search.warm_start is not None
    return search.model_copy(update={"sigma0": search.warm_start.sigma0, "warm_start": None})


def open_coarse_study(storage: str, study_name: str, fine_keys: list[str], search: SearchSpec) -> Any:
    """The warm-start study (created, or loaded to resume: the run's own study was checked
    for ``resume`` first, and this one belongs to it)."""
    study = open_study(storage, coarse_keys(fine_keys), coarse_spec(search), resume=True,
                       study_name=study_name + STAGE_SUFFIX)
    study.set_user_attr("stage", "warm start: one gene per model and parameter")
    return study


def best_trial(study: Any) -> Any:
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        raise ConfigError("the warm start completed no candidate; see its failed trials' errors "
                          "in the study")
    return sorted(done, key=lambda t: (-t.value, t.number))[0]


def dropped_models(coarse: Mapping[str, float], ranges: Mapping[str, tuple[float, float]],
                   drop_below: float | None) -> list[str]:
    """The model tags (``m0``, ...) whose warm-start weight is at most ``drop_below``."""
    if drop_below is None:
        return []
    from shoal.flow.genes import to_range

    out = []
    for key, gene in sorted(coarse.items()):
        tag, param = key.split(".")
        if param == "weight" and tag != "g" and key in ranges and to_range(gene, *ranges[key]) <= drop_below:
            out.append(tag)
    return out


def run_staged(study: Any, config: EvolveConfig, fine_keys: list[str], evaluations: Evaluations, *,
               storage: str, study_name: str, run_dir: Path,
               ranges: Mapping[str, tuple[float, float]] | None = None,
               progress: ProgressFn = no_progress) -> Any:
    """Run (or resume) both stages until the run holds ``search.trials`` completed trials in all:
    ``warm_start.trials`` in the warm-start study, the rest in ``study``. Returns the
    warm-start study."""
    search = config.search
    ws = search.warm_start
    if ws is None:
        raise ConfigError("search.warm_start is not set: this run has one stage")
    total = search.trials
    coarse = open_coarse_study(storage, study_name, fine_keys, search)

    def coarse_progress(stage: str, done: int, _total: int | None) -> None:
        progress(stage, done, total)

    run_trials(coarse, coarse_keys(fine_keys), _Expanding(evaluations, fine_keys), ws.trials,
               progress=coarse_progress)
    start = best_trial(coarse)
    x0 = expand(start.params, fine_keys)
    coarse_ranges = {coarse_key(k): r for k, r in (ranges or {}).items()}
    if ws.drop_below is not None and not coarse_ranges:
        raise ConfigError("search.warm_start.drop_below needs the genes' ranges")
    dropped = dropped_models(start.params, coarse_ranges, ws.drop_below)
    fixed = {k: v for k, v in x0.items() if k.split(".")[0] in dropped}
    record = {"stage": "per-layer CMA-ES", "from_warm_start_trial": start.number,
              "warm_start_study": study_name + STAGE_SUFFIX, "fitness": start.value,
              "coarse_genome": dict(sorted(start.params.items())), "x0": x0, "sigma0": ws.sigma0,
              "warm_start_trials": ws.trials, "per_layer_trials": total - ws.trials,
              "recipe": start.user_attrs.get("recipe"), "dropped_models": dropped,
              "searched_genes": len(fine_keys) - len(fixed)}
    _write_json(run_dir / WARM_START_FILE, record)
    study.sampler = make_sampler(fine_spec(search), x0)
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial(x0, user_attrs={"warm_start": start.number})
    done = finished_trials(coarse)

    def fine_progress(stage: str, finished: int, _total: int | None) -> None:
        progress(stage, done + finished, total)

    run_trials(study, fine_keys, evaluations, total - ws.trials, fixed=fixed, progress=fine_progress)
    return coarse


def completed_trials(study: Any, config: EvolveConfig, storage: str, study_name: str) -> int:
    """Completed trials of the whole run: every stage when it has a warm start, a portfolio or
    ``own_layers_first``."""
    if config.search.portfolio is not None:
        from shoal.evolve.portfolio import completed_trials as portfolio_trials

        return portfolio_trials(study, config, storage, study_name)
    if config.search.own_layers_first is not None:
        from shoal.evolve.dfs_stages import completed_trials as two_stage_trials

        return two_stage_trials(study, storage, study_name)
    done = finished_trials(study)
    if config.search.warm_start is None:
        return done
    import optuna

    from shoal.evolve.search import make_storage

    try:
        coarse = optuna.load_study(study_name=study_name + STAGE_SUFFIX, storage=make_storage(storage))
    except KeyError:
        return done
    return done + finished_trials(coarse)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
