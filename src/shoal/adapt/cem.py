"""Cross-entropy method: a derivative-free maximizer for few-shot expert mixing.

Each iteration samples ``population`` points from a diagonal Gaussian, keeps the best
``elite_frac`` of them, and refits the Gaussian's mean and standard deviation to the elite
(Rubinstein 1999; Transformer² uses it with population 32, elite 20%, 50-100 iterations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from shoal.errors import ConfigError
from shoal.progress import ProgressFn, no_progress


@dataclass(frozen=True)
class CEMResult:
    best: torch.Tensor  # the best point ever evaluated, (dim,)
    best_value: float
    mean: torch.Tensor  # the final distribution mean, (dim,)
    history: tuple[float, ...]  # best value found by the end of each iteration
    evaluations: int


def cem(objective: Callable[[torch.Tensor], float], dim: int, *, population: int = 32, elite_frac: float = 0.2,
        iterations: int = 50, init_mean: float | Sequence[float] | torch.Tensor = 0.0,
        init_std: float | Sequence[float] | torch.Tensor = 1.0, min_std: float = 1e-3, seed: int = 0,
        evaluate_mean: bool = True, progress: ProgressFn = no_progress) -> CEMResult:
    """Maximize ``objective`` over R^dim. ``evaluate_mean`` also scores the initial mean, so
    the result is never worse than the starting point."""
    if dim < 1 or population < 2 or not 0 < elite_frac <= 1 or iterations < 1:
        raise ConfigError("cem needs dim >= 1, population >= 2, 0 < elite_frac <= 1, iterations >= 1")
    generator = torch.Generator().manual_seed(seed)
    mean = torch.as_tensor(init_mean, dtype=torch.float64).expand(dim).clone()
    std = torch.as_tensor(init_std, dtype=torch.float64).expand(dim).clone()
    n_elite = max(1, math.ceil(population * elite_frac))
    best, best_value, evaluations = mean.clone(), -math.inf, 0
    if evaluate_mean:
        best_value, evaluations = float(objective(mean.clone())), 1
    history: list[float] = []
    for it in range(iterations):
        samples = mean + std * torch.randn((population, dim), generator=generator, dtype=torch.float64)
        values = torch.tensor([float(objective(s.clone())) for s in samples], dtype=torch.float64)
        evaluations += population
        order = torch.argsort(values, descending=True)
        if values[order[0]] > best_value:
            best, best_value = samples[order[0]].clone(), float(values[order[0]])
        elite = samples[order[:n_elite]]
        mean = elite.mean(0)
        std = elite.std(0, unbiased=False).clamp(min=min_std) if n_elite > 1 else std.clamp(min=min_std)
        history.append(best_value)
        progress("cem", it + 1, iterations)
    return CEMResult(best.float(), best_value, mean.float(), tuple(history), evaluations)
