"""An evolution run, start to finish: search on fitness, pick on validation, report on test.

The run folder holds ``config.yaml`` (what was asked), ``study.db`` (every trial, unless an
external storage URL is given), ``best_recipe.yaml``, ``model/`` (the final merge, a Hugging
Face folder with its model card), ``scores.json`` and the report (``report.html`` + PNGs).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from shoal.errors import ConfigError
from shoal.evolve.candidate import CandidateBuilder
from shoal.evolve.config import EvolveConfig, parse_evolve_config
from shoal.evolve.search import default_storage, finished_trials, open_study, run_trials
from shoal.evolve.space import SearchSpace, build_space
from shoal.merge.recipe import ModelEntry, Recipe
from shoal.progress import ProgressFn, no_progress

CONFIG_FILE = "config.yaml"
BEST_RECIPE = "best_recipe.yaml"
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
    run_dir: Path
    best_recipe: Recipe
    best_fitness: float
    best_validation: float | None
    trials: int
    model_dir: Path | None
    scores: tuple[Score, ...] = field(default_factory=tuple)


def resolve_model_ref(ref: str) -> str:
    """``zoo:SIZE/NAME`` (a model of the miniature world, built when missing) -> its folder."""
    if not ref.startswith("zoo:"):
        return ref
    spec = ref[len("zoo:"):]
    if "/" not in spec:
        raise ConfigError(f"{ref!r}: write zoo models as zoo:SIZE/NAME, e.g. zoo:small/math_a")
    size, name = spec.split("/", 1)
    from shoal.zoo import build_zoo

    world = build_zoo(size)
    return str(world.model(name))


def resolve_config(config: EvolveConfig) -> EvolveConfig:
    """The config with ``zoo:`` model references replaced by folders."""
    mapping = {m: resolve_model_ref(m) for m in [*config.models] + ([config.base_model] if config.base_model else [])}
    return config.model_copy(update={
        "models": [mapping[m] for m in config.models],
        "base_model": mapping[config.base_model] if config.base_model else None,
        "hold_at_zero": [mapping[m] for m in config.hold_at_zero],
    })


class Evaluator:
    """A resident model that candidates are written into, and the tasks they are scored on."""

    def __init__(self, config: EvolveConfig):
        from transformers import AutoTokenizer

        from shoal.eval.loading import prepare_tokenizer

        self.config = config
        models = ([config.base_model] if config.base_model else []) + list(config.models)
        self.builder = CandidateBuilder(models, device=config.device)
        self.reference = config.base_model or config.models[0]
        reader = self.builder.readers[self.reference]
        arch = ((reader.config or {}).get("architectures") or [None])[0]
        self.space: SearchSpace = build_space(config, reader.tensor_names(), arch)
        self.model = self.builder.load_model(self.reference)
        folder = reader.path if Path(reader.path).is_dir() else Path(reader.path).parent
        self.tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(folder))

    def close(self) -> None:
        self.builder.close()

    def score_recipe(self, recipe: Recipe, task: str | list[str], split: str, limit: int | None) -> Any:
        """Merge ``recipe`` into the resident model and score it; several tasks give the mean."""
        from shoal.eval import get_task
        from shoal.eval.evaluate import evaluate, result_from_scores

        self.builder.apply(self.model, recipe, seed=self.config.seed)
        names = [task] if isinstance(task, str) else list(task)
        results = []
        with torch.inference_mode():
            for name in names:
                results.append(evaluate(self.model, self.tokenizer, get_task(name), split, limit=limit,
                                        batch_size=self.config.batch_size))
        if len(results) == 1:
            return results[0]
        mean = sum(r.score for r in results) / len(results)
        return replace(result_from_scores("+".join(names), split, (), [mean]),
                       n=sum(r.n for r in results))

    def fitness(self, genome: dict[str, float]) -> tuple[float, dict]:
        spec = self.config.fitness
        result = self.score_recipe(self.space.decode(genome), spec.task, spec.split, spec.limit)
        return result.score, {"n": result.n}


def _worker(config_data: dict, storage: str, threads: int) -> None:
    torch.set_num_threads(threads)
    config = parse_evolve_config(config_data)
    evaluator = Evaluator(config)
    try:
        study = open_study(storage, evaluator.space, config.search, resume=True, recover=False)
        run_trials(study, evaluator.space, evaluator.fitness, config.search.trials)
    finally:
        evaluator.close()


def _save_config(run_dir: Path, config: EvolveConfig, resume: bool) -> None:
    path = run_dir / CONFIG_FILE
    data = config.model_dump(mode="json")
    if path.exists():
        saved = yaml.safe_load(path.read_text())
        if saved != data:
            if not resume:
                raise ConfigError(f"{run_dir} already holds a different run; use a new folder")
            raise ConfigError(f"{path} differs from the config given; resume with the same config")
        return
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def search(config: EvolveConfig, run_dir: Path, *, resume: bool = False, workers: int = 1,
           executor: str = "local", progress: ProgressFn = no_progress) -> tuple[Evaluator, Any]:
    """Run (or resume) the search; returns the evaluator and the Optuna study."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _save_config(run_dir, config, resume)
    storage = config.storage or default_storage(run_dir)
    evaluator = Evaluator(config)
    study = open_study(storage, evaluator.space, config.search, resume=resume)
    if executor == "ray":
        from shoal.evolve.ray_executor import run_on_ray

        run_on_ray(config, storage, workers, progress=progress)
    elif workers <= 1:
        run_trials(study, evaluator.space, evaluator.fitness, config.search.trials, progress=progress)
    else:
        _run_local_workers(config, storage, workers, study, progress)
    return evaluator, study


def _run_local_workers(config: EvolveConfig, storage: str, workers: int, study: Any,
                       progress: ProgressFn) -> None:
    context = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    data = config.model_dump(mode="json")
    processes = [context.Process(target=_worker, args=(data, storage, threads)) for _ in range(workers)]
    for process in processes:
        process.start()
    total = config.search.trials
    while any(p.is_alive() for p in processes):
        progress("evolve", min(finished_trials(study), total), total)
        time.sleep(1.0)
    progress("evolve", min(finished_trials(study), total), total)
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    if failed:
        raise ConfigError(f"{len(failed)} of {workers} workers failed (exit codes {failed})")


def load_run_study(run_dir: Path, storage: str | None = None) -> Any:
    """The Optuna study of a run folder (its default SQLite file unless ``storage`` is given)."""
    import optuna

    from shoal.evolve.search import STUDY_NAME, make_storage

    saved = yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text()) if storage is None else None
    url = storage or (saved or {}).get("storage") or default_storage(Path(run_dir))
    return optuna.load_study(study_name=STUDY_NAME, storage=make_storage(url))


def top_trials(study: Any, k: int) -> list[Any]:
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return sorted(done, key=lambda t: (-t.value, t.number))[:k]


def select_final(evaluator: Evaluator, study: Any, *, progress: ProgressFn = no_progress
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
        result = evaluator.score_recipe(evaluator.space.decode(trial.params), spec.task, spec.split,
                                        spec.limit)
        scored.append((result.score, trial.value, -trial.number, trial))
        progress("validate", i, len(candidates))
    val, fit, _, best = max(scored, key=lambda row: row[:3])
    return dict(best.params), fit, val


def uniform_recipe(config: EvolveConfig, **values: float) -> Recipe:
    """The method with every model at the same parameter values (a baseline)."""
    params = {k: v for k, v in values.items()}
    entries = [ModelEntry(model=m, parameters=dict(params)) for m in config.models
               if not (config.base_model and m == config.base_model)]
    return Recipe(merge_method=config.method, base_model=config.base_model, models=entries,
                  parameters=dict(config.fixed), seed=config.seed)  # type: ignore[arg-type]


def report_scores(evaluator: Evaluator, rows: Sequence[tuple[str, Recipe | str]], *,
                  progress: ProgressFn = no_progress) -> list[Score]:
    """Test scores of each row (a recipe merged in memory, or a model folder) on the report tasks."""
    from shoal.eval import get_task, load_model
    from shoal.eval.evaluate import evaluate

    spec = evaluator.config.report
    tasks = spec.tasks or evaluator.config.fitness.tasks
    scores: list[Score] = []
    total = len(rows) * len(tasks)
    done = 0
    for label, row in rows:
        if isinstance(row, Recipe):
            model, tokenizer = evaluator.model, evaluator.tokenizer
            evaluator.builder.apply(model, row, seed=evaluator.config.seed)
        else:
            model, tokenizer = load_model(row, device=evaluator.config.device)
        for task_name in tasks:
            with torch.inference_mode():
                result = evaluate(model, tokenizer, get_task(task_name), spec.split, limit=spec.limit,
                                  batch_size=evaluator.config.batch_size)
            scores.append(Score(label, task_name, spec.split, result.score, result.n, result.stderr))
            done += 1
            progress("report", done, total)
    return scores


def evolve(config: EvolveConfig, run_dir: str | Path, *, resume: bool = False, workers: int = 1,
           executor: str = "local", write_model: bool = True, baseline: dict[str, float] | None = None,
           extra_rows: Sequence[tuple[str, Recipe | str]] = (), report: bool = True,
           progress: ProgressFn = no_progress) -> EvolveResult:
    """Search, select on validation, write the best recipe, the model and the report."""
    from shoal.evolve.report import write_report
    from shoal.merge.execute import merge

    run_dir = Path(run_dir)
    config = resolve_config(config)
    evaluator, study = search(config, run_dir, resume=resume, workers=workers, executor=executor,
                              progress=progress)
    try:
        genome, fitness, validation = select_final(evaluator, study, progress=progress)
        best = evaluator.space.decode(genome)
        (run_dir / BEST_RECIPE).write_text(best.to_yaml())
        model_dir = None
        if write_model:
            model_dir = run_dir / "model"
            merge(best, model_dir, seed=config.seed, overwrite=True)
        if not report:
            return EvolveResult(run_dir=run_dir, best_recipe=best, best_fitness=fitness,
                                best_validation=validation, trials=finished_trials(study),
                                model_dir=model_dir)
        rows: list[tuple[str, Recipe | str]] = [(Path(m).name, m) for m in
                                               ([config.base_model] if config.base_model else []) + config.models]
        rows.append((f"uniform {config.method}", uniform_recipe(config, **(baseline or {}))))
        rows.extend(extra_rows)
        rows.append(("evolved", best))
        scores = report_scores(evaluator, rows, progress=progress)
        (run_dir / SCORES_FILE).write_text(json.dumps({
            "best_fitness": fitness, "best_validation": validation,
            "trials": finished_trials(study), "scores": [asdict(s) for s in scores],
        }, indent=2))
        write_report(run_dir, study, evaluator.space, genome, scores)
        return EvolveResult(run_dir=run_dir, best_recipe=best, best_fitness=fitness,
                            best_validation=validation, trials=finished_trials(study),
                            model_dir=model_dir, scores=tuple(scores))
    finally:
        evaluator.close()
