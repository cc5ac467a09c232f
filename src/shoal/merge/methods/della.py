"""DELLA: drop task-vector entries with magnitude-ranked probabilities, rescale each by 1/p_i."""

from __future__ import annotations

from typing import Sequence

from shoal.checkpoint.lazy_torch import torch
from shoal.merge.methods._inputs import Compat, PerModel, Randomness, generator_or_default, per_model
from shoal.merge.methods.generalized import generalized_task_arithmetic
from shoal.merge.methods.sparsify import drop_by_magnitude_rank
from shoal.merge.registry import merge_method

_PAPER = "https://arxiv.org/abs/2406.11617"


def _della(name: str, base: torch.Tensor, models: Sequence[torch.Tensor], *, weight: PerModel,
           density: PerModel, epsilon: PerModel, lambda_: float, normalize: bool, rescale: bool,
           generator: Randomness | None, compat: Compat, sign_consensus: bool) -> torch.Tensor:
    n = len(models)
    weights = per_model(name, "weight", weight, n)
    densities = per_model(name, "density", density, n, low=0.0, high=1.0)
    epsilons = per_model(name, "epsilon", epsilon, n, low=0.0, high=1.0)
    rng = generator_or_default(generator, compat)
    return generalized_task_arithmetic(
        base, models, method=name, weights=weights,
        sparsify=lambda delta, k: drop_by_magnitude_rank(delta, densities[k], epsilons[k], rng, model=k,
                                                         rescale=rescale, compat=compat),
        sign_consensus=sign_consensus, normalize=normalize, lambda_=lambda_, compat=compat)


@merge_method("della", needs_base=True, paper=_PAPER)
def della(base: torch.Tensor, models: Sequence[torch.Tensor], *, weight: PerModel = 1.0,
          density: PerModel = 1.0, epsilon: PerModel = 0.1, lambda_: float = 1.0, normalize: bool = True,
          rescale: bool = True, generator: Randomness | None = None,
          compat: Compat = "paper") -> torch.Tensor:
    """DELLA: magnitude-ranked random drop with 1/p_i rescaling, sign election, disjoint mean.

    Deep et al. 2024, "DELLA-Merging", https://arxiv.org/abs/2406.11617
    p_i = density - eps + 2 eps r_i / (n - 1) for magnitude rank r_i in its row; d_k = mask/p * (m_k - base)
    s = sgn(sum_k d_k);  result = base + lambda * sum_k w_k d_k [sgn d_k = s] / sum_k w_k [sgn d_k = s]
    """
    return _della("della", base, models, weight=weight, density=density, epsilon=epsilon, lambda_=lambda_,
                  normalize=normalize, rescale=rescale, generator=generator, compat=compat,
                  sign_consensus=True)


@merge_method("della_linear", needs_base=True, paper=_PAPER)
def della_linear(base: torch.Tensor, models: Sequence[torch.Tensor], *, weight: PerModel = 1.0,
                 density: PerModel = 1.0, epsilon: PerModel = 0.1, lambda_: float = 1.0,
                 normalize: bool = False, rescale: bool = True, generator: Randomness | None = None,
                 compat: Compat = "paper") -> torch.Tensor:
    """DELLA's magnitude-ranked random drop with 1/p_i rescaling, then the weighted sum.

    Deep et al. 2024, "DELLA-Merging", https://arxiv.org/abs/2406.11617
    p_i = density - eps + 2 eps r_i / (n - 1) for magnitude rank r_i in its row; d_k = mask/p * (m_k - base)
    result = base + lambda * sum_k w_k d_k   (with ``normalize``: divided by sum_k w_k)
    """
    return _della("della_linear", base, models, weight=weight, density=density, epsilon=epsilon,
                  lambda_=lambda_, normalize=normalize, rescale=rescale, generator=generator,
                  compat=compat, sign_consensus=False)
