"""Cross-entropy method: a derivative-free maximizer for few-shot expert mixing.

As Sakana's reference code runs it (SakanaAI/self-adaptive-llms ``optim_modules.CEM`` with
``cfgs/optimization/cem.yaml``): the search starts from ``init_mean``, with a standard
deviation of half the box width. Each iteration samples ``population`` points from the
diagonal Gaussian, clamps them into ``bounds``, and replaces the first point by the best
point so far (re-evaluated); the best point of the population becomes the new best, and the
Gaussian's mean and (unbiased) standard deviation are refitted to the ``int(elite_ratio *
population)`` highest-scoring points (at least one). Defaults: population 32, elite ratio
0.2 (6 elites), 50 iterations, bounds [0, 1].

The objective returns a score or a pair (score, tie-break): the best point is the one with
the highest score, and among equal scores the highest tie-break (the reference breaks ties
by the log-likelihood of the model's own correct answers); elites are chosen by score alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from shoal.errors import ConfigError
from shoal.progress import ProgressFn, no_progress

Fitness = float | tuple[float, float]


@dataclass(frozen=True)
class CEMResult:
    best: torch.Tensor  # the final best point, (dim,)
    best_value: float  # its score
    mean: torch.Tensor  # the final distribution mean, (dim,)
    history: tuple[float, ...]  # score of the best point at the end of each iteration
    evaluations: int
    best_tiebreak: float = 0.0


def _split(value: Fitness) -> tuple[float, float]:
    if isinstance(value, tuple):
        return float(value[0]), float(value[1])
    return float(value), 0.0


def cem(objective: Callable[[torch.Tensor], Fitness], dim: int, *, population: int = 32,
        elite_ratio: float = 0.2, iterations: int = 50,
        init_mean: float | Sequence[float] | torch.Tensor = 0.0,
        bounds: tuple[float, float] | None = (0.0, 1.0),
        init_std: float | Sequence[float] | torch.Tensor | None = None, seed: int = 0,
        progress: ProgressFn = no_progress) -> CEMResult:
    """Maximize ``objective`` over the box ``bounds`` (``None``: all of R^dim); see the module
    docstring. ``init_std`` defaults to half the box width (required when ``bounds`` is None)."""
    n_elite = max(1, int(elite_ratio * population))  # int(0.2 * 32) = 6 as in the reference
    if dim < 1 or population < 2 or iterations < 1 or not 0 < elite_ratio <= 1:
        raise ConfigError("cem needs dim >= 1, population >= 2, iterations >= 1 and "
                          "0 < elite_ratio <= 1")
    if bounds is not None and not bounds[0] < bounds[1]:
        raise ConfigError(f"cem bounds {bounds} must be (low, high) with low < high")
    if init_std is None:
        if bounds is None:
            raise ConfigError("cem without bounds needs init_std")
        init_std = (bounds[1] - bounds[0]) / 2
    generator = torch.Generator().manual_seed(seed)
    mean = torch.as_tensor(init_mean, dtype=torch.float64).expand(dim).clone()
    std = torch.as_tensor(init_std, dtype=torch.float64).expand(dim).clone()
    best = mean.clone()
    best_value, best_tiebreak = -math.inf, -math.inf
    history: list[float] = []
    for it in range(iterations):
        samples = mean + std * torch.randn((population, dim), generator=generator, dtype=torch.float64)
        if bounds is not None:
            samples = samples.clamp(bounds[0], bounds[1])
        samples[0] = best  # the reference's re_eval_best
        values = [_split(objective(s.clone())) for s in samples]
        scores = torch.tensor([v[0] for v in values], dtype=torch.float64)
        top = max(v[0] for v in values)
        tied = [i for i, v in enumerate(values) if v[0] == top]
        winner = max(tied, key=lambda i: values[i][1])  # first of the highest tie-breaks
        best, (best_value, best_tiebreak) = samples[winner].clone(), values[winner]
        elite = samples[torch.argsort(scores, descending=True, stable=True)[:n_elite]]
        mean = elite.mean(0)
        std = elite.std(0) if n_elite > 1 else torch.zeros_like(mean)
        history.append(best_value)
        progress("cem", it + 1, iterations)
    return CEMResult(best.float(), best_value, mean.float(), tuple(history), population * iterations, best_tiebreak)
