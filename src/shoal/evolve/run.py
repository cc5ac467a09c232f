"""An evolution run, start to finish: search on fitness, pick on validation, report on test.

The run folder holds ``config.yaml`` (what was asked), ``study.db`` (every trial, unless an
external storage URL is given), ``run.lock`` while a process runs the search, ``best_recipe.yaml``, ``model/`` (the final merge, a Hugging
Face folder with its model card), ``scores.json`` and the report (``report.html`` + PNGs).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from shoal.checkpoint.references import resolve_model_ref
from shoal.errors import ConfigError, ShoalError
from shoal.evolve.config import EvolveConfig, parse_evolve_config
from shoal.evolve.evaluators import make_evaluator, rows_for
from shoal.evolve.lock import run_lock
from shoal.evolve.preflight import check_config
from shoal.evolve.references import CONFIG_FILE
from shoal.evolve.saving import write_evolved_card
from shoal.evolve.search import default_storage, open_study, run_trials
from shoal.evolve.study_attrs import describe_study, run_study_name
from shoal.evolve.workers import Evaluations, InProcess, LocalWorkers, evaluator_threads
from shoal.progress import ProgressFn, no_progress

SCORES_FILE = "scores.json"


@dataclass(frozen=True)
class Score:
    """A test (or validation) score of one model on one task, with its example count."""

    model: str
    task: str
    split: str
    score: float
    n: int
    stderr: float


@dataclass(frozen=True)
class EvolveResult:
    """What a finished run found."""

    run_dir: Path
    genome: dict[str, float]
    description: str  # the best recipe (YAML) or path (text)
    best_fitness: float
    best_validation: float | None
    trials: int
    model_dir: Path | None
    scores: tuple[Score, ...] = field(default_factory=tuple)


def resolve_config(config: EvolveConfig, run_dir: Path | None = None) -> EvolveConfig:
    """The config with model references replaced by what to open (see
    :func:`shoal.checkpoint.references.resolve_model_ref`: ``zoo:`` models, finished run folders,
    hub ids), and merge recipes (``*.yaml``), which are merged into ``run_dir/sources/`` first."""
    mapping = {m: _resolve_source(m, run_dir) for m in
               [*config.models] + ([config.base_model] if config.base_model else [])}
    return config.model_copy(update={
        "models": [mapping[m] for m in config.models],
        "base_model": mapping[config.base_model] if config.base_model else None,
        "hold_at_zero": [mapping[m] for m in config.hold_at_zero],
        "prefix_maps": {mapping[m]: dict(v) for m, v in config.prefix_maps.items()},
    })


def _resolve_source(ref: str, run_dir: Path | None) -> str:
    if ref.endswith((".yaml", ".yml")) and Path(ref).is_file():
        if run_dir is None:
            raise ConfigError(f"{ref}: a recipe as a source needs a run folder to merge it into")
        from shoal.merge.execute import merge

        out = run_dir / "sources" / Path(ref).stem
        if not (out / "config.json").exists():
            merge(ref, out, overwrite=True)
        return str(out)
    return resolve_model_ref(ref)


def _save_config(run_dir: Path, config: EvolveConfig, resume: bool) -> None:
    """Write the run's config; a resumed run must ask for the same search (only the trial budget
    and the thread count may change)."""
    path = run_dir / CONFIG_FILE
    data = config.model_dump(mode="json")
    if path.exists():
        saved = yaml.safe_load(path.read_text())
        try:  # a folder written before a config key existed holds that key's default
            saved = parse_evolve_config(saved, where=str(path)).model_dump(mode="json")
        except ConfigError:
            pass

        def same_search(d: dict) -> dict:
            search_keys = {k: v for k, v in d.get("search", {}).items() if k != "trials"}
            return {**{k: v for k, v in d.items() if k != "threads"}, "search": search_keys}

        if same_search(saved) != same_search(data):
            if not resume:
                raise ConfigError(f"{run_dir} already holds a different run; use a new folder")
            changed = sorted(k for k in data if k != "threads" and saved.get(k) != data[k])
            raise ConfigError(f"{path} differs from the config given (in {', '.join(changed)}); "
                              "resume with the same config (only search.trials may change)")
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@contextmanager
def _removed_on_failure(run_dir: Path) -> Iterator[None]:
    """Undo what the body creates in ``run_dir`` if it raises: a start that fails leaves the
    folder as it was (absent, or holding only what it held), so the corrected rerun starts."""
    existed = run_dir.exists()
    before = set(os.listdir(run_dir)) if existed else set()
    try:
        yield
    except BaseException:
        if run_dir.is_dir():
            for name in set(os.listdir(run_dir)) - before:
                target = run_dir / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
            if not existed and not any(run_dir.iterdir()):
                run_dir.rmdir()
        raise


def _check_first_candidate(evaluator: Any) -> None:
    """Plan the starting candidate's merge (headers only): a recipe every trial would fail on
    (a parameter the method rejects, too many models for it) is refused before the study."""
    space = getattr(evaluator, "space", None)
    builder = getattr(evaluator, "builder", None)
    if builder is None or not hasattr(space, "decode"):
        return
    from shoal.merge.plan import plan_merge

    recipe = space.decode(evaluator.x0 or space.default_genome())
    try:
        plan_merge(recipe, builder.readers, seed=evaluator.config.seed)
    except ShoalError as err:
        raise ConfigError(f"the search's candidates cannot be merged: {err}") from None


@dataclass
class _Run:
    config: EvolveConfig
    evaluator: Any
    study: Any = None
    run_dir: Path | None = None
    storage: str = ""
    study_name: str = ""

    def trials(self) -> int:
        """Completed trials of the whole run (both stages of a warm-started search)."""
        from shoal.evolve.stages import completed_trials

        return completed_trials(self.study, self.config, self.storage, self.study_name)

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()

    def hand_over(self) -> Any:
        """The evaluator, now the caller's to close."""
        evaluator, self.evaluator = self.evaluator, None
        return evaluator


@contextmanager
def _open_run(config: EvolveConfig, run_dir: Path, resume: bool) -> Iterator[_Run]:
    """Check the config, lock the run folder, build the evaluator and open the study; the
    lock is held and the caller's torch threads are set to ``config.threads`` until the end.

    Nothing is written before the checks pass, and a start that fails after them removes what
    it wrote."""
    config = check_config(config)
    with ExitStack() as stack:
        stack.enter_context(evaluator_threads(config.threads))
        with _removed_on_failure(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            stack.enter_context(run_lock(run_dir))
            config = resolve_config(config, run_dir)
            run = _Run(config, make_evaluator(config), run_dir=run_dir)
            stack.callback(run.close)
            _check_first_candidate(run.evaluator)
            _save_config(run_dir, config, resume)
            storage = config.storage or default_storage(run_dir)
            run.storage, run.study_name = storage, run_study_name(storage, run_dir)
            run.study = open_study(storage, run.evaluator.gene_keys, config.search, resume=resume,
                                   x0=run.evaluator.x0, study_name=run.study_name)
            describe_study(run.study, run.evaluator)
        yield run


def _run_search(run: _Run, workers: int, executor: str, progress: ProgressFn) -> None:
    config = run.config
    if executor == "ray":
        from shoal.evolve.ray_executor import RayWorkers

        evaluations: Evaluations = RayWorkers(config, workers, config.threads)
    elif workers <= 1:
        evaluations = InProcess(run.evaluator.fitness)
    else:
        evaluations = LocalWorkers(config.model_dump(mode="json"), workers, config.threads)
    try:
        if config.search.portfolio is not None:
            from shoal.evolve.portfolio import run_portfolio

            assert run.run_dir is not None
            run_portfolio(run.study, config, run.evaluator.gene_keys, evaluations, storage=run.storage,
                          study_name=run.study_name, run_dir=run.run_dir, progress=progress)
        elif config.search.own_layers_first is not None:
            from shoal.evolve.dfs_stages import run_own_layers_first

            assert run.run_dir is not None
            run_own_layers_first(run.study, config, run.evaluator.space, evaluations, storage=run.storage,
                                 study_name=run.study_name, run_dir=run.run_dir, progress=progress)
        elif config.search.warm_start is not None:
            from shoal.evolve.stages import run_staged

            assert run.run_dir is not None
            run_staged(run.study, config, run.evaluator.gene_keys, evaluations, storage=run.storage,
                       study_name=run.study_name, run_dir=run.run_dir,
                       ranges={g.key: (g.low, g.high) for g in run.evaluator.space.genes}, progress=progress)
        else:
            run_trials(run.study, run.evaluator.gene_keys, evaluations, config.search.trials,
                       progress=progress)
    finally:
        evaluations.close()


def search(config: EvolveConfig, run_dir: Path, *, resume: bool = False, workers: int = 1,
           executor: str = "local", progress: ProgressFn = no_progress) -> tuple[Any, Any]:
    """Run (or resume) the search; returns the evaluator (the caller closes it) and the study.

    ``workers`` candidates are evaluated at a time, in local processes (``executor="local"``)
    or on Ray; each evaluator uses ``config.threads`` torch threads."""
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    with _open_run(config, Path(run_dir), resume) as run:
        _run_search(run, workers, executor, progress)
        return run.hand_over(), run.study


def load_run_study(run_dir: Path, storage: str | None = None) -> Any:
    """The Optuna study of a run folder (its default SQLite file unless ``storage`` is given)."""
    import optuna

    from shoal.evolve.search import make_storage

    saved = yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text()) if storage is None else None
    url = storage or (saved or {}).get("storage") or default_storage(Path(run_dir))
    return optuna.load_study(study_name=run_study_name(url, Path(run_dir)), storage=make_storage(url))


def top_trials(study: Any, k: int) -> list[Any]:
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return sorted(done, key=lambda t: (-t.value, t.number))[:k]


def select_final(evaluator: Any, study: Any, *, progress: ProgressFn = no_progress
                 ) -> tuple[dict[str, float], float, float | None]:
    """The final genome: the best of the top-k fitness trials on the validation split."""
    config = evaluator.config
    k = config.validation.top_k if config.validation else 1
    candidates = top_trials(study, k)
    if not candidates:
        raise ConfigError("no candidate completed; see the failed trials' errors in the study")
    if config.validation is None:
        best = candidates[0]
        return dict(best.params), best.value, None
    spec = config.validation
    scored = []
    for i, trial in enumerate(candidates, start=1):
        result = evaluator.score_genome(trial.params, spec.task, spec.split, spec.limit)
        scored.append((result.score, trial.value, -trial.number, trial))
        progress("validate", i, len(candidates))
    val, fit, _, best = max(scored, key=lambda row: row[:3])
    return dict(best.params), fit, val


def report_scores(evaluator: Any, rows: Sequence[tuple[str, Any]], *,
                  progress: ProgressFn = no_progress) -> list[Score]:
    """Test scores of each row (a recipe, a genome, or a model folder) on the report tasks."""
    spec = evaluator.config.report
    tasks = spec.tasks or evaluator.config.fitness.tasks
    scores: list[Score] = []
    total = len(rows) * len(tasks)
    for label, row in rows:
        for task_name in tasks:
            result = evaluator.score_row(row, task_name, spec.split, spec.limit)
            scores.append(Score(label, task_name, spec.split, result.score, result.n, result.stderr))
            progress("report", len(scores), total)
    return scores


def evolve(config: EvolveConfig, run_dir: str | Path, *, resume: bool = False, workers: int = 1,
           executor: str = "local", write_model: bool = True, baseline: dict[str, float] | None = None,
           extra_rows: Sequence[tuple[str, Any]] = (), report: bool = True,
           progress: ProgressFn = no_progress) -> EvolveResult:
    """Search, select on validation, write the best recipe, the model and the report.

    The run folder is locked for the whole run: a second process on the same folder is
    refused while this one lives (see :mod:`shoal.evolve.lock`)."""
    from shoal.evolve.report import write_report

    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    run_dir = Path(run_dir)
    with _open_run(config, run_dir, resume) as run:
        _run_search(run, workers, executor, progress)
        evaluator, study = run.evaluator, run.study
        if config.search.portfolio is not None:  # the pick ranges over every stage's trials
            from shoal.evolve import portfolio

            genome, fitness, validation = portfolio.select_final(
                evaluator, study, storage=run.storage, study_name=run.study_name, run_dir=run_dir,
                progress=progress)
        elif config.search.own_layers_first is not None:  # the pick ranges over both stages' trials
            from shoal.evolve import dfs_stages

            genome, fitness, validation = dfs_stages.select_final(
                evaluator, study, storage=run.storage, study_name=run.study_name, run_dir=run_dir,
                progress=progress)
        else:
            genome, fitness, validation = select_final(evaluator, study, progress=progress)
        model_dir = evaluator.save_best(genome, run_dir, write_model=write_model)
        if not report:
            return EvolveResult(run_dir=run_dir, genome=genome, description=evaluator.describe(genome),
                                best_fitness=fitness, best_validation=validation,
                                trials=run.trials(), model_dir=model_dir)
        rows = rows_for(evaluator, genome, baseline, extra_rows)
        scores = report_scores(evaluator, rows, progress=progress)
        (run_dir / SCORES_FILE).write_text(json.dumps({
            "best_fitness": fitness, "best_validation": validation,
            "trials": run.trials(), "scores": [asdict(s) for s in scores],
        }, indent=2))
        write_report(run_dir, study, evaluator, genome, scores)
        write_evolved_card(run_dir, evaluator, run.trials(), scores, validation)
        return EvolveResult(run_dir=run_dir, genome=genome, description=evaluator.describe(genome),
                            best_fitness=fitness, best_validation=validation,
                            trials=run.trials(), model_dir=model_dir, scores=tuple(scores))
