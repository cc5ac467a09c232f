"""The search loop on Optuna: samplers, study storage, resume and failed candidates."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from shoal.errors import ConfigError
from shoal.evolve.config import SearchSpec
from shoal.progress import ProgressFn, no_progress

STUDY_NAME = "shoal-evolve"

log = logging.getLogger(__name__)


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ConfigError("shoal evolve needs Optuna: pip install 'shoal[evolve]'") from None
    return optuna


def default_storage(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'study.db').resolve()}"


def make_storage(url: str) -> Any:
    """An Optuna storage for ``url``: ``sqlite:///...``, ``postgresql://...``, or
    ``journal:PATH`` for a journal file (good for many processes on one machine or a shared disk)."""
    optuna = _optuna()
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):]))
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def make_sampler(spec: SearchSpec, x0: dict[str, float] | None = None) -> Any:
    """CMA-ES with the paper's settings, or random / TPE for comparison.

    The paper's settings are Optuna's defaults: start at the middle of every range (0.5 for
    our genes), sigma 1/6 of the range, population 4 + floor(3 ln n). Only a sigma the user
    asks for is passed on."""
    optuna = _optuna()
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed)
    kwargs: dict[str, Any] = {}
    if spec.sigma0 is not None:
        kwargs["sigma0"] = spec.sigma0
    if x0 is not None:
        kwargs["x0"] = dict(x0)
    import warnings

    with warnings.catch_warnings():  # x0 / sigma0 are deprecated in Optuna 4.9 but still honoured
        warnings.simplefilter("ignore", FutureWarning)
        return optuna.samplers.CmaEsSampler(popsize=spec.population, seed=spec.seed,
                                            with_margin=spec.with_margin,
                                            warn_independent_sampling=False, **kwargs)


def open_study(storage_url: str, gene_keys: list[str], spec: SearchSpec, *, resume: bool,
               recover: bool = True, x0: dict[str, float] | None = None,
               study_name: str = STUDY_NAME) -> Any:
    """Create the study, or load it to resume.

    With ``recover`` (the coordinating process, before any worker starts), trials left running
    by a killed process are marked failed, so they are neither lost silently nor counted as done.
    Workers joining a live study pass ``recover=False``: the running trials are their peers'."""
    optuna = _optuna()
    storage = make_storage(storage_url)
    existing = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if study_name in existing and not resume:
        raise ConfigError(f"a study already exists in {storage_url}; pass resume=True to continue it or "
                          "use a new run folder")
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize",
                                sampler=make_sampler(spec, x0), load_if_exists=True)
    study.set_user_attr("genes", list(gene_keys))
    if not recover:
        return study
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial._trial_id, "error", "interrupted (process killed)")
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    return study


def finished_trials(study: Any) -> int:
    optuna = _optuna()
    states = (optuna.trial.TrialState.COMPLETE,)
    return len(study.get_trials(deepcopy=False, states=states))


def run_trials(study: Any, gene_keys: list[str], score: Callable[[dict[str, float]], tuple[float, dict]],
               trials: int, *, progress: ProgressFn = no_progress) -> None:
    """Run until the study holds ``trials`` completed trials (across every worker and resume).

    ``score(genome) -> (fitness, extra user attributes)``. A candidate that raises (NaN weights,
    an exception, out of memory) is recorded as a failed trial with its error and the search
    goes on.
    """
    optuna = _optuna()
    done_states = (optuna.trial.TrialState.COMPLETE,)

    def objective(trial: Any) -> float:
        genome = {key: trial.suggest_float(key, 0.0, 1.0) for key in gene_keys}
        try:
            value, attrs = score(genome)
        except Exception as err:  # a failed candidate, recorded and skipped
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:500])
            raise
        for key, item in attrs.items():
            trial.set_user_attr(key, item)
        return value

    def report(study: Any, trial: Any) -> None:
        progress("evolve", min(finished_trials(study), trials), trials)

    progress("evolve", min(finished_trials(study), trials), trials)
    while finished_trials(study) < trials:
        remaining = trials - finished_trials(study)
        study.optimize(objective, n_trials=remaining, catch=(Exception,),
                       callbacks=[optuna.study.MaxTrialsCallback(trials, states=done_states), report],
                       gc_after_trial=False)
        if _all_recent_failed(study, limit=20):
            raise ConfigError("the last 20 candidates all failed; first error: "
                              + str(study.trials[-1].user_attrs.get("error", "unknown")))


def _all_recent_failed(study: Any, limit: int) -> bool:
    optuna = _optuna()
    recent = study.get_trials(deepcopy=False)[-limit:]
    return len(recent) >= limit and all(t.state == optuna.trial.TrialState.FAIL for t in recent)
