"""The cross-entropy method, as the reference runs it, on toy objectives with known optima."""

from __future__ import annotations

import pytest
import torch

from shoal.adapt import cem
from shoal.errors import ConfigError


def test_finds_the_optimum_of_a_quadratic_inside_the_box():
    center = torch.tensor([0.2, 0.7, 0.9, 0.45])
    result = cem(lambda x: -float(((x - center) ** 2).sum()), 4, init_mean=0.5, seed=1)  # reference defaults
    torch.testing.assert_close(result.best, center, atol=2e-2, rtol=0)
    assert result.evaluations == 32 * 50 and len(result.history) == 50
    assert list(result.history) == sorted(result.history)  # the best is re-evaluated: never lost


def test_clamps_to_the_bounds():
    # the unconstrained optimum (2, -1) lies outside [0, 1]^2: the answer is the corner (1, 0)
    target = torch.tensor([2.0, -1.0])
    result = cem(lambda x: -float(((x - target) ** 2).sum()), 2, init_mean=0.5, iterations=20, seed=0)
    assert torch.equal(result.best, torch.tensor([1.0, 0.0]))
    seen: list[torch.Tensor] = []
    cem(lambda x: seen.append(x) or 0.0, 3, init_mean=0.5, bounds=(0.0, 1.0), iterations=3, seed=0)
    assert all(float(x.min()) >= 0.0 and float(x.max()) <= 1.0 for x in seen)
    free = cem(lambda x: -float(((x - target) ** 2).sum()), 2, bounds=None, init_std=2.0, iterations=30, seed=0)
    torch.testing.assert_close(free.best, target, atol=5e-2, rtol=0)


def test_one_iteration_by_the_reference_rules():
    """First point = the start (re-evaluated best), elites = the int(0.2 * 32) = 6 best, mean and
    unbiased std refitted to them, the std starting at half the box width."""
    seen: list[torch.Tensor] = []

    def score(x: torch.Tensor) -> float:
        seen.append(x.double())
        return float(x.sum())

    result = cem(score, 2, init_mean=[0.25, 0.75], iterations=1, seed=4)
    points = torch.stack(seen)
    assert points.shape == (32, 2) and torch.equal(points[0], torch.tensor([0.25, 0.75], dtype=torch.float64))
    elite = points[torch.argsort(points.sum(-1), descending=True)[:6]]
    torch.testing.assert_close(result.mean.double(), elite.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(result.best.double(), elite[0], atol=1e-6, rtol=0)
    cem(score, 1, init_mean=0.5, iterations=1, population=4000, seed=0)  # many draws from the start
    draws = torch.stack(seen[33:])[:, 0]  # seen[32] is the start itself
    inside = draws[(draws > 0) & (draws < 1)]
    assert abs(float((inside > 0.5).float().mean()) - 0.5) < 0.05  # centred on the start
    assert 0.30 < float((draws == 0).float().mean() + (draws == 1).float().mean()) < 0.34  # P(|N(0, .5)| > .5)


def test_ties_in_score_are_broken_by_the_second_value():
    # the score is flat (1 on half the box); the tie-break prefers x[1] near 0.3
    def fitness(x: torch.Tensor) -> tuple[float, float]:
        return float(x[0] > 0.5), -abs(float(x[1]) - 0.3)

    result = cem(fitness, 2, init_mean=0.5, seed=2)
    assert result.best_value == 1.0 and float(result.best[0]) > 0.5
    assert abs(float(result.best[1]) - 0.3) < 0.02 and result.best_tiebreak > -0.02
    plain = cem(lambda x: fitness(x)[0], 2, init_mean=0.5, seed=2)  # no tie-break: the first best point stays
    assert plain.best_value == 1.0 and abs(float(plain.best[1]) - 0.3) > abs(float(result.best[1]) - 0.3)


def test_is_deterministic_and_checks_arguments():
    def f(x: torch.Tensor) -> float:
        return -float(x.abs().sum())

    a = cem(f, 2, iterations=3, seed=5)
    b = cem(f, 2, iterations=3, seed=5)
    assert torch.equal(a.best, b.best) and a.history == b.history
    for bad in (dict(dim=0), dict(dim=2, elite_ratio=0.0), dict(dim=2, bounds=(1.0, 0.0)),
                dict(dim=2, bounds=None)):
        with pytest.raises(ConfigError):
            cem(f, **{"iterations": 3, **bad})  # type: ignore[arg-type]
