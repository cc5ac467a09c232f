"""Task vectors and how they are combined: sign election, disjoint merge, weighted sum."""

from __future__ import annotations

from typing import Sequence

from shoal.checkpoint.lazy_torch import torch

_NORMALIZE_EPS = 1e-8


def task_vector(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``model - base`` in ``base``'s dtype: what fine-tuning added to the base (a new tensor)."""
    return model.to(base.dtype) - base


def elect_sign(deltas: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *,
               zero_is_positive: bool = False) -> torch.Tensor:
    """Per coordinate, the sign with the larger total mass: ``sgn(sum_k w_k delta_k)``.

    TIES elects on the unweighted deltas (``weights=None``); where the sum is exactly zero no
    sign wins (0). mergekit elects on weighted deltas and picks + there (``zero_is_positive``).
    """
    if weights is None:  # 0 + d_0 + d_1 + ... is d_0 + d_1 + ... (a -0.0 sum only differs in sign(): -0.0 == 0)
        total = deltas[0].clone()
        for delta in deltas[1:]:
            total.add_(delta)
    else:
        total = torch.zeros_like(deltas[0])
        for delta, weight in zip(deltas, weights):
            total.add_(delta, alpha=weight)
    if zero_is_positive:
        return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    return torch.sign(total)


def disjoint_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], elected: torch.Tensor, *,
                   normalize: bool = True) -> torch.Tensor:
    """Combine, per coordinate, only the nonzero deltas whose sign is the elected one.

    ``sum_k w_k delta_k [agree_k] / sum_k w_k [agree_k]`` (the weighted disjoint mean; a zero
    divisor counts as 1); without ``normalize`` just the numerator. The deltas are modified.
    """
    numerator = torch.zeros_like(deltas[0])
    denominator = torch.zeros_like(deltas[0]) if normalize else None
    for delta, weight in zip(deltas, weights):
        agree = torch.sign(delta) == elected  # a zero delta only "agrees" where nothing won: it adds 0
        numerator.add_(delta.mul_(agree), alpha=weight)  # (a dropped -x becomes -0.0: adds nothing)
        if denominator is not None:
            denominator.add_(agree.to(denominator.dtype), alpha=weight)
    if denominator is None:
        return numerator
    return numerator.div_(denominator.add_(denominator == 0))  # a zero divisor becomes exactly 1


def weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float], *,
                 normalize: bool = False) -> torch.Tensor:
    """``sum_k w_k delta_k``, divided by ``sum_k w_k`` with ``normalize`` (unless that sum is ~0)."""
    total = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights):
        total.add_(delta, alpha=weight)
    weight_sum = sum(weights)
    if normalize and abs(weight_sum) >= _NORMALIZE_EPS:
        total.div_(weight_sum)
    return total
