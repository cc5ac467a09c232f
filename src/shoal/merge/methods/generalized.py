"""Generalized task arithmetic: the one routine behind task arithmetic, TIES, DARE, DELLA and Breadcrumbs.

    delta_k  = sparsify_k(m_k - base)                       (none, trim, random drop, ...)
    merged   = disjoint_merge(delta, w, elect_sign(delta))  with sign consensus
             = sum_k w_k delta_k (/ sum_k w_k)              without
    result   = base + lambda * merged

Each named method is this routine with one sparsifier and a consensus setting.
"""

from __future__ import annotations

from typing import Callable, Sequence

from shoal.checkpoint.lazy_torch import torch
from shoal.merge.methods._inputs import Compat, check_compat, check_tensors, working_dtype
from shoal.merge.methods.consensus import disjoint_merge, elect_sign, task_vector, weighted_sum

# (task vector of model k, k) -> sparsified task vector; may work in place
Sparsifier = Callable[["torch.Tensor", int], "torch.Tensor"]


def generalized_task_arithmetic(base: torch.Tensor, models: Sequence[torch.Tensor], *, method: str,
                                weights: Sequence[float], sparsify: Sparsifier | None,
                                sign_consensus: bool, normalize: bool, lambda_: float,
                                compat: Compat = "paper") -> torch.Tensor:
    """Merge task vectors: sparsify, optionally elect signs, combine, scale by ``lambda_``, add to ``base``.

    ``compat="mergekit"`` elects signs on weighted deltas (+ on a tie) instead of the
    unweighted deltas.
    """
    check_compat(method, compat)
    out_dtype = check_tensors(method, base, models, needs_base=True)
    work_base = base.to(working_dtype(base.dtype))
    deltas = []
    for k, model in enumerate(models):
        delta = task_vector(model, work_base)
        deltas.append(sparsify(delta, k) if sparsify is not None else delta)
    if sign_consensus:
        if compat == "mergekit":
            elected = elect_sign(deltas, weights, zero_is_positive=True)
        else:
            elected = elect_sign(deltas)
        merged = disjoint_merge(deltas, weights, elected, normalize=normalize)
    else:
        merged = weighted_sum(deltas, weights, normalize=normalize)
    if lambda_ != 1.0:
        merged.mul_(lambda_)
    return merged.add_(work_base).to(out_dtype)
