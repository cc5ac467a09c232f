"""In-memory per-block search over text-to-image pipelines: candidates, CMA-ES, uniform control.

A :class:`PipelineCandidates` holds the base pipeline's UNet and text-encoder tensors and every
specialist's task vector, and one resident pipeline whose weights it overwrites for each
candidate (task arithmetic per group, :mod:`shoal.evolve.diffusion_space`); nothing is written
to disk. The fitness of a candidate is any function of the resident pipeline, e.g.
:func:`shoal.eval.drawing.score_drawing` on the fitness split.

:func:`evolve_blocks` runs CMA-ES (the paper's settings: start 0.5, sigma 1/6, genes in
[0, 1]) for a number of evaluations; :func:`uniform_search` spends the same number of
evaluations on the one gene of the uniform merge (every model and group at one weight).
Both run on Optuna through the loop ``shoal evolve`` uses (:func:`shoal.evolve.search.run_trials`),
in memory or in a study storage that a second call resumes. Both pick their final point the
same way: the ``top_k`` best by fitness re-scored on validation, best validation wins (ties:
the better fitness).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from shoal.errors import ConfigError
from shoal.evolve.config import SearchSpec
from shoal.evolve.diffusion_space import TEXT, UNET, DiffusionSpace, tensor_groups
from shoal.flow.genes import to_range
from shoal.progress import ProgressFn, no_progress

ScoreFn = Callable[[Any], float]
BLOCKS_STUDY, UNIFORM_STUDY = "diffusion-per-block", "diffusion-uniform"
UNIFORM_GENE = "weight"


class PipelineCandidates:
    """One resident pipeline that becomes any per-group task-arithmetic merge of the sources."""

    def __init__(self, base: Any, specialists: Mapping[str, Any]) -> None:
        if not specialists:
            raise ConfigError("a pipeline merge needs at least one specialist besides the base")
        self.models = tuple(specialists)
        self.resident = copy.deepcopy(base)
        self._base: dict[tuple[str, str], torch.Tensor] = {}
        self._delta: dict[str, dict[tuple[str, str], torch.Tensor]] = {m: {} for m in self.models}
        for component in (UNET, TEXT):
            base_state = getattr(base, component).state_dict()
            for name, tensor in base_state.items():
                self._base[(component, name)] = tensor.detach().clone().float()
            for model, pipe in specialists.items():
                state = getattr(pipe, component).state_dict()
                missing = set(base_state) ^ set(state)
                if missing:
                    raise ConfigError(f"{component} of {model!r} does not match the base's tensors: "
                                      f"{sorted(missing)[:3]}")
                for name, tensor in state.items():
                    self._delta[model][(component, name)] = tensor.detach().float() - self._base[
                        (component, name)]
        self.groups = tensor_groups(base.unet.state_dict(), base.text_encoder.state_dict())
        self._live = {(c, n): t for c in (UNET, TEXT)
                      for n, t in getattr(self.resident, c).state_dict().items()}

    @torch.no_grad()
    def apply(self, weights: Mapping[tuple[str, str], float]) -> Any:
        """Make the resident pipeline the merge with ``(model, group) -> weight``; return it."""
        for key, base in self._base.items():
            group = self.groups[key]
            merged = base.clone()
            for model in self.models:
                weight = weights.get((model, group))
                if weight is None:
                    raise ConfigError(f"no weight for model {model!r}, group {group!r}")
                if weight != 0.0:
                    merged.add_(self._delta[model][key], alpha=weight)
            self._live[key].copy_(merged)
        return self.resident


@dataclass
class SearchTrace:
    """Every evaluated point (genes and fitness) and the pick."""

    genomes: list[list[float]] = field(default_factory=list)
    fitness: list[float] = field(default_factory=list)
    picked: list[float] | None = None
    picked_validation: float | None = None

    def best_curve(self) -> list[float]:
        """The best fitness seen after each evaluation."""
        return list(np.maximum.accumulate(self.fitness)) if self.fitness else []


def _pick(trace: SearchTrace, to_weights: Callable[[Sequence[float]], Mapping],
          candidates: PipelineCandidates, validation: ScoreFn, top_k: int) -> None:
    order = sorted(range(len(trace.fitness)), key=lambda i: -trace.fitness[i])[:top_k]
    best = None
    for i in order:
        score = validation(candidates.apply(to_weights(trace.genomes[i])))
        if best is None or score > best[0]:
            best = (score, i)
    assert best is not None
    trace.picked_validation, trace.picked = best[0], list(trace.genomes[best[1]])


def _search(study_name: str, label: str, keys: list[str], to_weights: Callable[[Sequence[float]], Mapping],
            candidates: PipelineCandidates, fitness: ScoreFn, validation: ScoreFn, *,
            spec: SearchSpec, storage: str | None, sampler: Any | None, top_k: int,
            progress: ProgressFn) -> SearchTrace:
    """Run (or, in a stored study, resume) ``spec.trials`` fitness calls on Optuna; pick on validation."""
    from shoal.evolve.search import finished_trials, open_study, run_trials
    from shoal.evolve.workers import InProcess

    def score(genome: dict[str, float]) -> tuple[float, dict]:
        return fitness(candidates.apply(to_weights([genome[k] for k in keys]))), {}

    def report(stage: str, done: int, total: int | None) -> None:
        progress(label, done, total)

    study = open_study(storage, keys, spec, resume=True, study_name=study_name, sampler=sampler)
    if finished_trials(study) > spec.trials:
        raise ConfigError(f"the stored {label} already holds {finished_trials(study)} evaluations, more "
                          f"than the {spec.trials} asked for; use a new folder")
    run_trials(study, keys, InProcess(score), spec.trials, progress=report)
    trace = SearchTrace()
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if trial.value is not None and trial.state.name == "COMPLETE":
            trace.genomes.append([float(trial.params[k]) for k in keys])
            trace.fitness.append(float(trial.value))
    _pick(trace, to_weights, candidates, validation, top_k)
    return trace


def _scan_sampler(points: Sequence[float]) -> Any:
    """An Optuna sampler that hands out ``points`` in order, each once (a point whose trial
    failed or was killed is handed out again). Optuna's GridSampler stops the study when its
    grid is done, which only ``study.optimize`` allows; the search loop asks and tells."""
    import optuna

    live = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)

    class Scan(optuna.samplers.BaseSampler):
        def infer_relative_search_space(self, study: Any, trial: Any) -> dict:
            return {}

        def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict:
            return {}

        def sample_independent(self, study: Any, trial: Any, name: str, distribution: Any) -> float:
            taken = {t.params.get(name) for t in study.get_trials(deepcopy=False, states=live)
                     if t.number != trial.number}
            return next((p for p in points if p not in taken), points[-1])

    return Scan()


def _check_budget(evaluations: int) -> None:
    if evaluations < 1:
        raise ConfigError(f"evaluations must be at least 1, got {evaluations}")


def evolve_blocks(candidates: PipelineCandidates, space: DiffusionSpace, fitness: ScoreFn,
                  validation: ScoreFn, *, evaluations: int, population: int | None = None,
                  seed: int = 0, top_k: int = 3, storage: str | None = None,
                  progress: ProgressFn | None = None) -> SearchTrace:
    """CMA-ES over the space's genes (Optuna's sampler with the paper's settings, as
    ``shoal evolve`` runs it) for ``evaluations`` fitness calls; the pick on validation.

    With ``storage`` (an Optuna URL, e.g. ``sqlite:///run/study.db``) the study is kept there
    and a second call resumes it: completed evaluations are kept, an interrupted one is run
    again, and the budget is met exactly."""
    _check_budget(evaluations)
    keys = [g.key for g in space.genes]
    spec = SearchSpec(sampler="cmaes", trials=evaluations, seed=seed, population=population)
    return _search(BLOCKS_STUDY, "per-block search", keys, space.weights, candidates, fitness,
                   validation, spec=spec, storage=storage, sampler=None, top_k=top_k,
                   progress=progress or no_progress)


def uniform_search(candidates: PipelineCandidates, space: DiffusionSpace, fitness: ScoreFn,
                   validation: ScoreFn, *, evaluations: int, top_k: int = 3,
                   storage: str | None = None, progress: ProgressFn | None = None) -> SearchTrace:
    """The equal-budget control: ``evaluations`` evenly spaced values of the one uniform gene
    (every model and group at the same weight, same range and transform), the pick on
    validation. Kept in ``storage`` and resumed as :func:`evolve_blocks` is."""
    _check_budget(evaluations)

    def to_weights(genome: Sequence[float]) -> Mapping:
        return space.uniform_weights(to_range(genome[0], space.low, space.high))

    points = [float(x) for x in np.linspace(0.0, 1.0, evaluations)] if evaluations > 1 else [0.5]
    sampler = _scan_sampler(points)
    spec = SearchSpec(trials=evaluations)  # the budget; the scan sampler replaces the one it names
    return _search(UNIFORM_STUDY, "uniform search", [UNIFORM_GENE], to_weights, candidates, fitness,
                   validation, spec=spec, storage=storage, sampler=sampler, top_k=top_k,
                   progress=progress or no_progress)
