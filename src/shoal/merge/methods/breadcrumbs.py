"""Model Breadcrumbs: keep a band of task-vector magnitudes, without the largest outliers."""

from __future__ import annotations

from typing import Sequence

from shoal.checkpoint.lazy_torch import torch
from shoal.merge.methods._inputs import Compat, PerModel, per_model
from shoal.merge.methods.generalized import generalized_task_arithmetic
from shoal.merge.methods.sparsify import trim_outliers
from shoal.merge.registry import merge_method

_PAPER = "https://arxiv.org/abs/2312.06795"


def _breadcrumbs(name: str, base: torch.Tensor, models: Sequence[torch.Tensor], *, weight: PerModel,
                 density: PerModel, gamma: PerModel, lambda_: float, normalize: bool, rescale: bool,
                 compat: Compat, sign_consensus: bool) -> torch.Tensor:
    n = len(models)
    weights = per_model(name, "weight", weight, n)
    densities = per_model(name, "density", density, n, low=0.0, high=1.0)
    gammas = per_model(name, "gamma", gamma, n, low=0.0, high=1.0)
    return generalized_task_arithmetic(
        base, models, method=name, weights=weights,
        sparsify=lambda delta, k: trim_outliers(delta, densities[k], gammas[k], rescale=rescale, compat=compat),
        sign_consensus=sign_consensus, normalize=normalize, lambda_=lambda_, compat=compat)


@merge_method("breadcrumbs", needs_base=True, paper=_PAPER)
def breadcrumbs(base: torch.Tensor, models: Sequence[torch.Tensor], *, weight: PerModel = 1.0,
                density: PerModel = 1.0, gamma: PerModel = 0.01, lambda_: float = 1.0,
                normalize: bool = False, rescale: bool = False, compat: Compat = "paper") -> torch.Tensor:
    """Model Breadcrumbs: keep a middle band of each task vector's magnitudes, add the weighted sum.

    Davari & Belilovsky 2023, "Model Breadcrumbs", https://arxiv.org/abs/2312.06795
    d_k = m_k - base restricted to magnitude ranks [g, g + round(density_k n)), g = round(gamma_k n)
    result = base + lambda * sum_k w_k d_k   (with ``normalize``: divided by sum_k w_k)
    ``rescale``: scale each d_k back to the L1 norm of m_k - base (mergekit's option).
    """
    return _breadcrumbs("breadcrumbs", base, models, weight=weight, density=density, gamma=gamma,
                        lambda_=lambda_, normalize=normalize, rescale=rescale, compat=compat,
                        sign_consensus=False)


@merge_method("breadcrumbs_ties", needs_base=True, paper=_PAPER)
def breadcrumbs_ties(base: torch.Tensor, models: Sequence[torch.Tensor], *, weight: PerModel = 1.0,
                     density: PerModel = 1.0, gamma: PerModel = 0.01, lambda_: float = 1.0,
                     normalize: bool | None = None, rescale: bool = False,
                     compat: Compat = "paper") -> torch.Tensor:
    """Breadcrumbs sparsification followed by TIES sign election and disjoint merge.

    Davari & Belilovsky 2023, https://arxiv.org/abs/2312.06795, then TIES
    (https://arxiv.org/abs/2306.01708)
    d_k = band_k(m_k - base);  s = sgn(sum_k d_k)
    result = base + lambda * sum_k w_k d_k [sgn d_k = s] / sum_k w_k [sgn d_k = s]
    ``normalize=None`` means true (the disjoint mean) for ``compat="paper"``, false for "mergekit".
    ``rescale``: scale each d_k back to the L1 norm of m_k - base (mergekit's option).
    """
    if normalize is None:
        normalize = compat != "mergekit"
    return _breadcrumbs("breadcrumbs_ties", base, models, weight=weight, density=density, gamma=gamma,
                        lambda_=lambda_, normalize=normalize, rescale=rescale, compat=compat,
                        sign_consensus=True)
