"""The search loop on Optuna: samplers, study storage, resume, the trial budget and failed
candidates."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from shoal.errors import ConfigError
from shoal.evolve.config import SearchSpec
from shoal.evolve.workers import Evaluations
from shoal.progress import ProgressFn, no_progress

STUDY_NAME = "shoal-evolve"
INTERRUPTED = "interrupted (process killed)"
MAX_FAILURES_IN_A_ROW = 20

log = logging.getLogger(__name__)


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ConfigError("shoal evolve needs Optuna: pip install 'shoal[evolve]'") from None
    return optuna


def default_storage(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'study.db').resolve()}"


def make_storage(url: str | None) -> Any:
    """An Optuna storage for ``url``: ``sqlite:///...``, ``postgresql://...``, or
    ``journal:PATH`` for a journal file (good for many processes on one machine or a shared disk);
    ``None`` keeps the study in memory (nothing to resume)."""
    optuna = _optuna()
    if url is None:
        return optuna.storages.InMemoryStorage()
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


def open_study(storage_url: str | None, gene_keys: list[str], spec: SearchSpec, *, resume: bool,
               x0: dict[str, float] | None = None, study_name: str = STUDY_NAME,
               sampler: Any | None = None) -> Any:
    """Create the study, or load it to resume.

    Trials left running by a killed process are marked failed ("interrupted"), so they are
    neither lost silently nor counted as done: the search re-runs their budget slots. Only
    the holder of the run folder's lock (:mod:`shoal.evolve.lock`) may call this, since a
    live run's running trials would look the same. ``sampler`` replaces the one ``spec`` names
    (a grid, for a scan of one gene)."""
    optuna = _optuna()
    try:
        storage = make_storage(storage_url)
        existing = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    except ConfigError:
        raise
    except Exception as err:  # a malformed URL, an unreachable server, a file that is not a study
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot open the study storage {storage_url}: {first}") from None
    if study_name in existing and not resume:
        raise ConfigError(f"a study already exists in {storage_url}; pass resume=True to continue it or "
                          "use a new run folder")
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize",
                                sampler=sampler if sampler is not None else make_sampler(spec, x0),
                                load_if_exists=True)
    study.set_user_attr("genes", list(gene_keys))
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial._trial_id, "error", INTERRUPTED)
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    return study


def finished_trials(study: Any) -> int:
    optuna = _optuna()
    states = (optuna.trial.TrialState.COMPLETE,)
    return len(study.get_trials(deepcopy=False, states=states))


def run_trials(study: Any, gene_keys: list[str], evaluations: Evaluations, trials: int, *,
               fixed: Mapping[str, float] | None = None, progress: ProgressFn = no_progress) -> None:
    """Run until the study holds ``trials`` completed trials (across every resume), never more.

    This process asks the sampler for each candidate and tells the study its outcome; the
    candidates are scored by ``evaluations`` (in this process, local worker processes or Ray
    actors), ``evaluations.capacity`` at a time. A new candidate is asked for only while
    completed + running trials stay under the budget. A candidate that raises is recorded as
    a failed trial with its error and its slot is run again; after ``min(20, trials)``
    failures in a row the search stops with the first of their errors. Genes in ``fixed``
    keep their value in every trial (a one-point range, which CMA-ES leaves out of its space).
    """
    fixed = dict(fixed or {})
    optuna = _optuna()
    give_up_after = min(MAX_FAILURES_IN_A_ROW, trials)
    running: dict[int, Any] = {}
    failures: list[str] = []
    done = finished_trials(study)
    progress("evolve", min(done, trials), trials)
    try:
        while True:
            while len(failures) < give_up_after and len(running) < evaluations.capacity \
                    and done + len(running) < trials:
                trial = study.ask()
                genome = {key: trial.suggest_float(key, fixed[key], fixed[key]) if key in fixed
                          else trial.suggest_float(key, 0.0, 1.0) for key in gene_keys}
                running[trial.number] = trial
                evaluations.submit(trial.number, genome)
            if not running:
                break
            for outcome in evaluations.collect():
                trial = running.pop(outcome.key)
                if outcome.error is None:
                    for key, item in outcome.attrs.items():
                        trial.set_user_attr(key, item)
                    study.tell(trial, outcome.value)
                    done += 1
                    failures.clear()
                else:
                    log.warning("trial %d failed: %s", trial.number, _first_line(outcome.error))
                    trial.set_user_attr("error", outcome.error[:500])
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    failures.append(outcome.error)
                progress("evolve", min(done, trials), trials)
    finally:  # interrupted (Ctrl-C, a dead worker): nothing stays "running"
        for trial in running.values():
            trial.set_user_attr("error", INTERRUPTED)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    if len(failures) >= give_up_after:
        raise ConfigError(f"the last {len(failures)} candidates all failed; the first of them: "
                          f"{_first_line(failures[0])}")


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else text
