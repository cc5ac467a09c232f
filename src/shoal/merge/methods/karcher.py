"""Karcher mean: the Riemannian centre of mass of the models' directions on the unit sphere."""

from __future__ import annotations

import math
from typing import Sequence

from shoal.checkpoint.lazy_torch import torch
from shoal.errors import RecipeError
from shoal.merge.methods._inputs import check_tensors, working_dtype
from shoal.merge.registry import merge_method

PAPER = "https://arxiv.org/abs/2603.04972"


@merge_method("karcher", needs_base=False, optional_base=True, paper=PAPER, min_models=1)
def karcher(base: torch.Tensor | None, models: Sequence[torch.Tensor], *, max_iter: float = 10,
            tol: float = 1e-5) -> torch.Tensor:
    """Karcher mean: the point on the sphere minimizing the summed squared arc lengths, scaled by the mean norm.

    Karcher 1977 (Riemannian centre of mass), as mergekit implements it: https://arxiv.org/abs/2603.04972
    Points: the models, plus the base when the recipe names one (mergekit adds a base_model that is
    not among the models as one more input). u_k = m_k / |m_k|, equal weights over points with
    |m_k| > tol; mu_0 = normalized mean of the u_k; repeat up to ``max_iter`` times:
    v = mean_k theta_k / sin(theta_k) (u_k - cos(theta_k) mu), theta_k = arccos<mu, u_k> (skipped below tol);
    stop when |v| < tol, else mu = cos|v| mu + sin|v| v / |v|, renormalized. result = mean_k |m_k| * mu.
    Follows mergekit 0.1.5 exactly.
    """
    points = list(models) + ([base] if base is not None else [])
    out_dtype = check_tensors("karcher", None, points, needs_base=False, min_models=1)
    iterations = _whole_number("max_iter", max_iter)
    if tol < 0:
        raise RecipeError(f"merge method 'karcher': tol must be >= 0, got {tol}")
    if len(points) == 1:
        return points[0].to(out_dtype)
    dtype = working_dtype(out_dtype)
    flat = [p.to(dtype).reshape(-1) for p in points]
    norms = [float(v.norm()) for v in flat]
    valid = [(v / n) for v, n in zip(flat, norms) if n > tol]
    if not valid:
        return torch.zeros_like(points[0], dtype=out_dtype)
    alpha = 1.0 / len(valid)
    mean = sum(alpha * u for u in valid)
    mean_norm = float(mean.norm())
    mean = valid[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(iterations):
        tangent = torch.zeros_like(mean)
        for unit in valid:
            cosine = max(-1.0, min(1.0, float(mean @ unit)))
            theta = math.acos(cosine)
            if theta < tol:
                continue
            tangent += (alpha * theta / math.sin(theta)) * (unit - cosine * mean)
        step = float(tangent.norm())
        if step < tol:
            break
        mean = math.cos(step) * mean + math.sin(step) * (tangent / step)
        length = float(mean.norm())
        if length > tol:
            mean = mean / length
    scale = sum(norms) / len(points)
    return (scale * mean).reshape(points[0].shape).to(out_dtype)


def _whole_number(name: str, value: float) -> int:
    if value != int(value) or value < 0:
        raise RecipeError(f"merge method 'karcher': {name} must be a whole number >= 0, got {value}")
    return int(value)
