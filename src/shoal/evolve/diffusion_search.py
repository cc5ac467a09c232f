"""In-memory per-block search over text-to-image pipelines: candidates, CMA-ES, uniform control.

A :class:`PipelineCandidates` holds the base pipeline's UNet and text-encoder tensors and every
specialist's task vector, and one resident pipeline whose weights it overwrites for each
candidate (task arithmetic per group, :mod:`shoal.evolve.diffusion_space`); nothing is written
to disk. The fitness of a candidate is any function of the resident pipeline, e.g.
:func:`shoal.eval.drawing.score_drawing` on the fitness split.

:func:`evolve_blocks` runs CMA-ES (the paper's settings: start 0.5, sigma 1/6, genes in
[0, 1]) for a number of evaluations; :func:`uniform_search` spends the same number of
evaluations on the one gene of the uniform merge (every model and group at one weight).
Both pick their final point the same way: the ``top_k`` best by fitness re-scored on
validation, best validation wins (ties: better fitness).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from shoal.errors import ConfigError
from shoal.evolve.diffusion_space import TEXT, UNET, DiffusionSpace, tensor_groups
from shoal.flow.genes import to_range
from shoal.progress import ProgressFn, no_progress

ScoreFn = Callable[[Any], float]


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


def evolve_blocks(candidates: PipelineCandidates, space: DiffusionSpace, fitness: ScoreFn,
                  validation: ScoreFn, *, evaluations: int, population: int | None = None,
                  seed: int = 0, top_k: int = 3, progress: ProgressFn | None = None) -> SearchTrace:
    """CMA-ES over the space's genes for ``evaluations`` fitness calls; the pick on validation."""
    from cmaes import CMA

    if evaluations < 1:
        raise ConfigError(f"evaluations must be at least 1, got {evaluations}")
    report = progress or no_progress
    dims = space.size
    bounds = np.array([[0.0, 1.0]] * dims)
    optimizer = CMA(mean=np.full(dims, 0.5), sigma=1 / 6, bounds=bounds, seed=seed,
                    population_size=population)
    trace = SearchTrace()
    report("per-block search", 0, evaluations)
    while len(trace.fitness) < evaluations:
        told = []
        for _ in range(optimizer.population_size):
            x = optimizer.ask()
            if len(trace.fitness) < evaluations:
                value = fitness(candidates.apply(space.weights(x)))
                trace.genomes.append([float(v) for v in x])
                trace.fitness.append(value)
                report("per-block search", len(trace.fitness), evaluations)
            else:
                value = min(trace.fitness)
            told.append((x, -value))  # cmaes minimizes
        optimizer.tell(told)
    _pick(trace, space.weights, candidates, validation, top_k)
    return trace


def uniform_search(candidates: PipelineCandidates, space: DiffusionSpace, fitness: ScoreFn,
                   validation: ScoreFn, *, evaluations: int, top_k: int = 3,
                   progress: ProgressFn | None = None) -> SearchTrace:
    """The equal-budget control: ``evaluations`` evenly spaced values of the one uniform gene
    (every model and group at the same weight, same range and transform), the pick on validation."""
    if evaluations < 1:
        raise ConfigError(f"evaluations must be at least 1, got {evaluations}")
    report = progress or no_progress

    def to_weights(genome: Sequence[float]) -> Mapping:
        return space.uniform_weights(to_range(genome[0], space.low, space.high))

    trace = SearchTrace()
    report("uniform search", 0, evaluations)
    for x in np.linspace(0.0, 1.0, evaluations) if evaluations > 1 else [0.5]:
        trace.genomes.append([float(x)])
        trace.fitness.append(fitness(candidates.apply(to_weights([x]))))
        report("uniform search", len(trace.fitness), evaluations)
    _pick(trace, to_weights, candidates, validation, top_k)
    return trace
