"""Task arithmetic: add weighted task vectors to the base."""

from __future__ import annotations

from typing import Sequence

from shoal.checkpoint.lazy_torch import torch
from shoal.merge.methods._inputs import PerModel, per_model
from shoal.merge.methods.generalized import generalized_task_arithmetic
from shoal.merge.registry import merge_method


@merge_method("task_arithmetic", needs_base=True, paper="https://arxiv.org/abs/2212.04089",
              chunked="shoal.merge.chunks:elementwise")
def task_arithmetic(base: torch.Tensor, models: Sequence[torch.Tensor], *, weight: PerModel = 1.0,
                    lambda_: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """Task arithmetic: add the weighted task vectors (model minus base) to the base.

    Ilharco et al. 2023, "Editing Models with Task Arithmetic", https://arxiv.org/abs/2212.04089
    result = base + lambda * sum_k w_k (m_k - base)   (with ``normalize``: divided by sum_k w_k)
    """
    weights = per_model("task_arithmetic", "weight", weight, len(models))
    return generalized_task_arithmetic(base, models, method="task_arithmetic", weights=weights,
                                       sparsify=None, sign_consensus=False, normalize=normalize,
                                       lambda_=lambda_)
