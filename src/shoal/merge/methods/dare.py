"""DARE: drop task-vector entries at random and rescale the survivors."""

from __future__ import annotations

from typing import Sequence

from shoal.checkpoint.lazy_torch import torch
from shoal.merge.methods._inputs import Compat, PerModel, Randomness, generator_or_default, per_model
from shoal.merge.methods.generalized import generalized_task_arithmetic
from shoal.merge.methods.sparsify import drop_random
from shoal.merge.registry import merge_method

_PAPER = "https://arxiv.org/abs/2311.03099"


def _dare(name: str, base: torch.Tensor, models: Sequence[torch.Tensor], *, weight: PerModel,
          density: PerModel, lambda_: float, normalize: bool, rescale: bool,
          generator: Randomness | None, compat: Compat, sign_consensus: bool) -> torch.Tensor:
    n = len(models)
    weights = per_model(name, "weight", weight, n)
    densities = per_model(name, "density", density, n, low=0.0, high=1.0)
    rng = generator_or_default(generator, compat)
    return generalized_task_arithmetic(
        base, models, method=name, weights=weights,
        sparsify=lambda delta, k: drop_random(delta, densities[k], rng, model=k, rescale=rescale, compat=compat),
        sign_consensus=sign_consensus, normalize=normalize, lambda_=lambda_, compat=compat)


@merge_method("dare_ties", needs_base=True, paper=_PAPER, chunked="shoal.merge.fast.dare:dare_ties_stages")
def dare_ties(base: torch.Tensor, models: Sequence[torch.Tensor], *, weight: PerModel = 1.0,
              density: PerModel = 1.0, lambda_: float = 1.0, normalize: bool | None = None,
              rescale: bool = True, generator: Randomness | None = None,
              compat: Compat = "paper") -> torch.Tensor:
    """DARE-TIES: random drop with 1/p rescaling, then TIES sign election and disjoint mean.

    Yu et al. 2024, "Language Models are Super Mario" (DARE), https://arxiv.org/abs/2311.03099
    d_k = mask_k (m_k - base) / p_k, mask_k ~ Bernoulli(p_k = density_k);  s = sgn(sum_k d_k)
    result = base + lambda * sum_k w_k d_k [sgn d_k = s] / sum_k w_k [sgn d_k = s]
    ``normalize=None`` means true (the disjoint mean) for ``compat="paper"``, false for "mergekit".
    """
    if normalize is None:
        normalize = compat != "mergekit"
    return _dare("dare_ties", base, models, weight=weight, density=density, lambda_=lambda_,
                 normalize=normalize, rescale=rescale, generator=generator, compat=compat,
                 sign_consensus=True)


@merge_method("dare_linear", needs_base=True, paper=_PAPER, chunked="shoal.merge.fast.dare:dare_linear_stages")
def dare_linear(base: torch.Tensor, models: Sequence[torch.Tensor], *, weight: PerModel = 1.0,
                density: PerModel = 1.0, lambda_: float = 1.0, normalize: bool = False,
                rescale: bool = True, generator: Randomness | None = None,
                compat: Compat = "paper") -> torch.Tensor:
    """DARE with task arithmetic: random drop with 1/p rescaling, then the weighted sum.

    Yu et al. 2024, "Language Models are Super Mario" (DARE), https://arxiv.org/abs/2311.03099
    d_k = mask_k (m_k - base) / p_k, mask_k ~ Bernoulli(p_k = density_k)
    result = base + lambda * sum_k w_k d_k   (with ``normalize``: divided by sum_k w_k)
    """
    return _dare("dare_linear", base, models, weight=weight, density=density, lambda_=lambda_,
                 normalize=normalize, rescale=rescale, generator=generator, compat=compat,
                 sign_consensus=False)
