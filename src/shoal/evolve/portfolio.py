"""A portfolio of stages and CMA-ES restarts in one budget (``search.portfolio``).

The stages run in order, each its own Optuna study in the run's storage:

1. **shared** (``shared_trials``, ``<study>.shared``): one gene per parameter (``density``,
   ``weight``) that every model and layer share, the uniform merges. Its genes are named and
   ordered as the equal-budget uniform search's, so with the same sampler and seed it asks for
   the same candidates.
2. **per source** (``per_source_trials``, ``<study>.per-source``): one gene per model and
   parameter (``m0.weight``, ...), as ``search.warm_start``'s stage 1. The shared stage's
   trials are added to its study first as history (they lie on its diagonal, every model with
   the same values), so its sampler starts from what the shared stage learnt; they are not
   evaluated again and do not count against its trials.
3. **restarts** (``restarts``, ``<study>.restart-<i>``; the last one is the run's own study): a
   per-layer CMA-ES each, its mean at its start point and its step ``sigma0`` (default 1/6,
   the single stage's). ``start: middle`` is 0.5 in every gene (where the single stage
   starts); ``start: best`` is the best trial of every stage before it (lowest stage, then
   lowest trial number, on ties). The start point is the restart's first trial. A restart's
   sampler seed is ``search.seed + i``.

Every coarse genome is evaluated as the per-layer genome it stands for, so every stage scores
the same kind of candidate on the same fitness split. The budget is exact: each stage runs
until its study holds its completed trials, failed and killed candidates re-run, so the run
holds ``search.trials`` in all. ``--resume`` continues the stage the run was killed in (earlier
stages are complete; a restart's start point is found again from them, the same one).
The final candidate is the best on validation among the top-k fitness trials of all stages.
``portfolio.json`` in the run folder records each stage: its study, trials, start point (the
stage and trial it came from, its fitness, the per-layer ``x0``, step and seed) and the pick.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from shoal.errors import ConfigError
from shoal.evolve.config import EvolveConfig, RestartSpec, SearchSpec
from shoal.evolve.search import make_sampler, open_study, run_trials
from shoal.evolve.stages import coarse_key, coarse_keys, expand
from shoal.evolve.workers import Evaluations, Outcome
from shoal.progress import ProgressFn, no_progress

PORTFOLIO_FILE = "portfolio.json"
HISTORY_ATTR = "history_of_shared_trial"  # a per-source trial copied from the shared stage
START_ATTR = "start"  # a restart's first trial: its start point
MIDDLE = 0.5


def shared_key(fine_key: str) -> str:
    """``m0.c3.weight`` -> ``weight``: the gene every model and layer share."""
    return coarse_key(fine_key).split(".")[1]


def shared_keys(fine_keys: list[str]) -> list[str]:
    """Sorted, as the uniform search orders its genes (``density``, ``weight``)."""
    return sorted({shared_key(k) for k in fine_keys})


def expand_shared(shared: Mapping[str, float], fine_keys: list[str]) -> dict[str, float]:
    return {key: float(shared[shared_key(key)]) for key in fine_keys}


@dataclass(frozen=True)
class Stage:
    kind: str  # "shared" | "per-source" | "restart"
    label: str  # "shared", "per-source", "restart 0 (middle)", ...
    study_name: str
    trials: int
    restart: RestartSpec | None = None
    index: int = 0  # the restart's index

    def keys(self, fine_keys: list[str]) -> list[str]:
        if self.kind == "shared":
            return shared_keys(fine_keys)
        if self.kind == "per-source":
            return coarse_keys(fine_keys)
        return list(fine_keys)

    def fine(self, params: Mapping[str, float], fine_keys: list[str]) -> dict[str, float]:
        """The per-layer genome a trial of this stage stands for."""
        if self.kind == "shared":
            return expand_shared(params, fine_keys)
        if self.kind == "per-source":
            return expand(params, fine_keys)
        return {k: float(params[k]) for k in fine_keys}


def plan(search: SearchSpec, study_name: str) -> list[Stage]:
    """The stages of a portfolio search, in order; the last restart is the run's own study."""
    pf = search.portfolio
    if pf is None:
        raise ConfigError("search.portfolio is not set: this run has no portfolio")
    stages = []
    if pf.shared_trials:
        stages.append(Stage("shared", "shared", f"{study_name}.shared", pf.shared_trials))
    if pf.per_source_trials:
        stages.append(Stage("per-source", "per-source", f"{study_name}.per-source", pf.per_source_trials))
    budgets = pf.budgets(search.trials)
    for i, (restart, trials) in enumerate(zip(pf.restarts, budgets)):
        name = study_name if i == len(pf.restarts) - 1 else f"{study_name}.restart-{i}"
        stages.append(Stage("restart", f"restart {i} ({restart.start})", name, trials, restart, i))
    return stages


class _Mapped:
    """Evaluations of a stage's genomes as the per-layer genomes they stand for."""

    def __init__(self, inner: Evaluations, to_fine: Callable[[dict[str, float]], dict[str, float]]):
        self.inner, self.to_fine, self.capacity = inner, to_fine, inner.capacity

    def submit(self, key: int, genome: dict[str, float]) -> None:
        self.inner.submit(key, self.to_fine(genome))

    def collect(self) -> list[Outcome]:
        return self.inner.collect()

    def close(self) -> None:  # the caller closes the inner evaluations
        pass


def _complete(study: Any) -> list[Any]:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def _own(study: Any) -> list[Any]:
    """The completed trials a stage evaluated itself (not the history copied into it)."""
    return [t for t in _complete(study) if HISTORY_ATTR not in t.user_attrs]


def _open(stage: Stage, run_study: Any, storage: str, fine_keys: list[str], search: SearchSpec) -> Any:
    if stage.study_name == run_study.study_name:
        return run_study
    sampler = search.portfolio.sampler if stage.kind != "restart" else "cmaes"  # type: ignore[union-attr]
    spec = SearchSpec(sampler=sampler, trials=stage.trials, seed=search.seed)
    study = open_study(storage, stage.keys(fine_keys), spec, resume=True, study_name=stage.study_name)
    study.set_user_attr("stage", stage.label)
    return study


def _add_history(per_source: Any, shared: Any, fine_keys: list[str]) -> int:
    """Copy the shared stage's trials into the per-source study (once); returns how many it holds."""
    import optuna

    held = {t.user_attrs[HISTORY_ATTR] for t in _complete(per_source) if HISTORY_ATTR in t.user_attrs}
    keys = coarse_keys(fine_keys)
    distributions = {k: optuna.distributions.FloatDistribution(0.0, 1.0) for k in keys}
    for trial in _own(shared):
        if trial.number in held:
            continue
        params = {k: float(trial.params[k.split(".")[1]]) for k in keys}
        per_source.add_trial(optuna.trial.create_trial(
            params=params, distributions=distributions, value=trial.value,
            user_attrs={HISTORY_ATTR: trial.number, **{k: v for k, v in trial.user_attrs.items()
                                                       if k == "recipe"}}))
        held.add(trial.number)
    return len(held)


def _ranked(done: list[tuple[Stage, Any]], fine_keys: list[str]) -> list[tuple[Stage, Any]]:
    """Completed trials of the stages so far, best fitness first (earlier stage, lower number on ties)."""
    order = {id(stage): i for i, (stage, _) in enumerate(done)}
    rows = [(stage, t) for stage, study in done for t in _own(study)]
    return sorted(rows, key=lambda row: (-row[1].value, order[id(row[0])], row[1].number))


def _start(stage: Stage, done: list[tuple[Stage, Any]], fine_keys: list[str]) -> tuple[dict[str, float], dict]:
    assert stage.restart is not None
    if stage.restart.start == "middle":
        return {k: MIDDLE for k in fine_keys}, {"start": "middle"}
    ranked = _ranked(done, fine_keys)
    if not ranked:
        raise ConfigError(f"search.portfolio.restarts[{stage.index}]: start 'best' needs a stage before "
                          "it that completed a candidate")
    source, trial = ranked[0]
    return source.fine(trial.params, fine_keys), {"start": "best", "from_stage": source.label,
                                                   "from_study": source.study_name, "from_trial": trial.number,
                                                   "fitness": trial.value}


def _begin_restart(study: Any, stage: Stage, done: list[tuple[Stage, Any]], fine_keys: list[str],
                   search: SearchSpec) -> dict[str, Any]:
    """Point the restart's CMA-ES at its start and enqueue the start as its first trial (once)."""
    import optuna

    assert stage.restart is not None
    x0, where = _start(stage, done, fine_keys)
    seed = search.seed + stage.index
    spec = search.model_copy(update={"sigma0": stage.restart.sigma0, "portfolio": None, "seed": seed})
    study.sampler = make_sampler(spec, x0)
    alive = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
    if not any(START_ATTR in t.user_attrs for t in study.get_trials(deepcopy=False, states=alive)):
        study.enqueue_trial(x0, user_attrs={START_ATTR: stage.restart.start})
    return {**where, "x0": x0, "sigma0": stage.restart.sigma0 if stage.restart.sigma0 is not None else 1 / 6,
            "seed": seed}


def run_portfolio(study: Any, config: EvolveConfig, fine_keys: list[str], evaluations: Evaluations, *,
                  storage: str, study_name: str, run_dir: Path,
                  progress: ProgressFn = no_progress) -> list[tuple[Stage, Any]]:
    """Run (or resume) every stage until the run holds ``search.trials`` completed trials; returns
    each stage with its study."""
    search = config.search
    total = search.trials
    record: dict[str, Any] = {"trials": total, "stages": []}
    done: list[tuple[Stage, Any]] = []
    finished = 0
    for stage in plan(search, study_name):
        stage_study = _open(stage, study, storage, fine_keys, search)
        entry: dict[str, Any] = {"stage": stage.label, "study": stage.study_name, "trials": stage.trials}
        target = stage.trials
        if stage.kind == "per-source":
            shared = next((s for st, s in done if st.kind == "shared"), None)
            if shared is not None:
                entry["history_trials"] = _add_history(stage_study, shared, fine_keys)
                target += entry["history_trials"]
        elif stage.kind == "restart":
            entry.update(_begin_restart(stage_study, stage, done, fine_keys, search))
        record["stages"].append(entry)
        _write_json(run_dir / PORTFOLIO_FILE, record)
        before = finished

        def stage_progress(name: str, n: int, _total: int | None, before: int = before,
                           offset: int = target - stage.trials) -> None:
            progress(name, before + max(0, n - offset), total)

        run_trials(stage_study, stage.keys(fine_keys),
                   _Mapped(evaluations, lambda g, s=stage: s.fine(g, fine_keys)), target,
                   progress=stage_progress)
        finished += len(_own(stage_study))
        done.append((stage, stage_study))
    return done


def stage_studies(study: Any, config: EvolveConfig, storage: str, study_name: str) -> list[tuple[Stage, Any]]:
    """Every stage of a portfolio run that exists in the storage, with its study."""
    import optuna

    from shoal.evolve.search import make_storage

    out = []
    for stage in plan(config.search, study_name):
        if stage.study_name == study.study_name:
            out.append((stage, study))
            continue
        try:
            out.append((stage, optuna.load_study(study_name=stage.study_name, storage=make_storage(storage))))
        except KeyError:
            continue
    return out


def completed_trials(study: Any, config: EvolveConfig, storage: str, study_name: str) -> int:
    """Completed trials of the whole run, over every stage (history copies not counted)."""
    return sum(len(_own(s)) for _, s in stage_studies(study, config, storage, study_name))


def select_final(evaluator: Any, study: Any, *, storage: str, study_name: str, run_dir: Path | None = None,
                 progress: ProgressFn = no_progress) -> tuple[dict[str, float], float, float | None]:
    """The final genome: the best on validation among the top-k fitness trials of every stage."""
    config = evaluator.config
    fine_keys = list(evaluator.gene_keys)
    ranked = _ranked(stage_studies(study, config, storage, study_name), fine_keys)
    if not ranked:
        raise ConfigError("no candidate completed; see the failed trials' errors in the study")
    k = config.validation.top_k if config.validation else 1
    scored = []
    for rank, (stage, trial) in enumerate(ranked[:k]):
        genome = stage.fine(trial.params, fine_keys)
        validation = None
        if config.validation is not None:
            spec = config.validation
            validation = evaluator.score_genome(genome, spec.task, spec.split, spec.limit).score
            progress("validate", rank + 1, min(k, len(ranked)))
        scored.append(((validation if validation is not None else 0.0, trial.value, -rank),
                       genome, trial.value, validation, stage, trial))
    _, genome, fitness, validation, stage, trial = max(scored, key=lambda row: row[0])
    if run_dir is not None and (run_dir / PORTFOLIO_FILE).exists():
        record = json.loads((run_dir / PORTFOLIO_FILE).read_text())
        record["final"] = {"stage": stage.label, "study": stage.study_name, "trial": trial.number,
                           "fitness": fitness, "validation": validation,
                           "candidates": [{"stage": row[4].label, "trial": row[5].number, "fitness": row[2],
                                           "validation": row[3]} for row in scored]}
        _write_json(run_dir / PORTFOLIO_FILE, record)
    return genome, fitness, validation


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
