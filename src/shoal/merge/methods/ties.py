"""TIES-Merging: trim, elect sign, disjoint merge."""

from __future__ import annotations

from typing import Sequence

from shoal.checkpoint.lazy_torch import torch
from shoal.merge.methods._inputs import Compat, PerModel, per_model
from shoal.merge.methods.generalized import generalized_task_arithmetic
from shoal.merge.methods.sparsify import trim_by_magnitude
from shoal.merge.registry import merge_method


@merge_method("ties", needs_base=True, paper="https://arxiv.org/abs/2306.01708",
              chunked="shoal.merge.fast.ties:ties_stages")
def ties(base: torch.Tensor, models: Sequence[torch.Tensor], *, weight: PerModel = 1.0,
         density: PerModel = 1.0, lambda_: float = 1.0, normalize: bool = True, rescale: bool = False,
         compat: Compat = "paper") -> torch.Tensor:
    """TIES: trim task vectors to their largest entries, elect signs, average the agreeing entries.

    Yadav et al. 2023, "TIES-Merging", https://arxiv.org/abs/2306.01708
    d_k = top_{round(density_k n)}(m_k - base);  s = sgn(sum_k d_k)
    result = base + lambda * sum_k w_k d_k [sgn d_k = s] / sum_k w_k [sgn d_k = s]
    ``rescale`` (mergekit's option): each d_k is scaled back to the L1 norm of m_k - base.
    """
    n = len(models)
    weights = per_model("ties", "weight", weight, n)
    densities = per_model("ties", "density", density, n, low=0.0, high=1.0)
    return generalized_task_arithmetic(
        base, models, method="ties", weights=weights,
        sparsify=lambda delta, k: trim_by_magnitude(delta, densities[k], compat=compat, rescale=rescale),
        sign_consensus=True, normalize=normalize, lambda_=lambda_, compat=compat)
