"""Linear merge: a weighted average of the models."""

from __future__ import annotations

from typing import Sequence

from shoal.checkpoint.lazy_torch import torch
from shoal.errors import RecipeError
from shoal.merge.methods._inputs import PerModel, check_tensors, per_model, working_dtype
from shoal.merge.registry import merge_method


@merge_method("linear", needs_base=False, paper="https://arxiv.org/abs/2203.05482",
              chunked="shoal.merge.chunks:elementwise")
def linear(base: torch.Tensor | None, models: Sequence[torch.Tensor], *, weight: PerModel = 1.0,
           normalize: bool = True) -> torch.Tensor:
    """Linear: the weighted average of the models (a "model soup"); ``base`` is not used.

    Wortsman et al. 2022, "Model soups", https://arxiv.org/abs/2203.05482
    result = sum_k w_k m_k / sum_k w_k   (without ``normalize``: sum_k w_k m_k)
    """
    out_dtype = check_tensors("linear", None, models, needs_base=False)
    weights = per_model("linear", "weight", weight, len(models))
    dtype = working_dtype(out_dtype)
    total = torch.zeros(models[0].shape, dtype=dtype, device=models[0].device)
    for model, w in zip(models, weights):
        total.add_(model.to(dtype), alpha=w)
    if normalize:
        weight_sum = sum(weights)
        if abs(weight_sum) < 1e-8:
            raise RecipeError(f"merge method 'linear': the weights {weights} sum to 0, "
                              "so they cannot be normalized (set normalize: false)")
        total.div_(weight_sum)
    return total.to(out_dtype)
