"""RAM and RAM+ (tensor-local): average each entry over the models that changed it, keep unique changes whole."""

from __future__ import annotations

from typing import Sequence

from shoal.checkpoint.lazy_torch import torch
from shoal.errors import RecipeError
from shoal.merge.methods._inputs import check_tensors, working_dtype
from shoal.merge.registry import ParamSpec, merge_method

PAPER = "https://arxiv.org/abs/2601.13572"
EPSILON = ParamSpec("epsilon", "float", False, 1e-5,
                    doc="ram: task-vector entries at most this in magnitude count as unchanged")


@merge_method("ram", needs_base=True, paper=PAPER, chunked="shoal.merge.chunks:elementwise", own_params=(EPSILON,))
def ram(base: torch.Tensor, models: Sequence[torch.Tensor], *, epsilon: float = 1e-5) -> torch.Tensor:
    """RAM: each entry moves by the mean of the task vectors that changed it (|delta| > epsilon).

    "Reinforced Agent Merging", https://arxiv.org/abs/2601.13572 (mergekit's ``ram``)
    delta_k = m_k - base, c_k = [|delta_k| > epsilon], n = sum_k c_k;
    result = base + sum_k c_k delta_k / max(n, 1): an entry only one model changed keeps that change
    whole, one several changed gets their average. Entry by entry, so it runs in chunks.
    Follows mergekit 0.1.5 exactly.
    """
    out_dtype = check_tensors("ram", base, models, needs_base=True, min_models=1)
    origin, deltas, changed, count = _changes("ram", base, models, epsilon)
    merged = (deltas * changed).sum(dim=0) / count.clamp(min=1).to(deltas.dtype)
    return (origin + merged).to(out_dtype)


@merge_method("ramplus_tl", needs_base=True, paper=PAPER, own_params=(EPSILON,))
def ramplus_tl(base: torch.Tensor, models: Sequence[torch.Tensor], *, r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> torch.Tensor:
    """RAM+ (tensor-local): RAM with each model's unique changes scaled up by how much it shares.

    "Reinforced Agent Merging", https://arxiv.org/abs/2601.13572 (mergekit's ``ramplus_tl``)
    With RAM's c_k and n: per model, rho_k = #{c_k and n > 1} / max(#{c_k and n = 1}, epsilon) over
    the tensor and lambda_k = 1 + r * clamp(rho_k, 0, alpha); result = base + sum_k c_k delta_k
    (lambda_k where n = 1, 1/n where n > 1). Follows mergekit 0.1.5 exactly.
    """
    out_dtype = check_tensors("ramplus_tl", base, models, needs_base=True, min_models=1)
    if alpha < 0:
        raise RecipeError(f"merge method 'ramplus_tl': alpha must be >= 0, got {alpha}")
    origin, deltas, changed, count = _changes("ramplus_tl", base, models, epsilon)
    shared = count > 1  # (N...)
    unique = count == 1
    dims = tuple(range(1, deltas.dim()))
    shared_counts = (changed & shared).sum(dim=dims).to(deltas.dtype)  # (K,)
    unique_counts = (changed & unique).sum(dim=dims).to(deltas.dtype)
    ratio = shared_counts / unique_counts.clamp(min=epsilon)
    scale = (1.0 + r * ratio.clamp(0.0, alpha)).reshape(-1, *([1] * (deltas.dim() - 1)))  # (K, 1...)
    factor = torch.where(unique, scale, shared.to(deltas.dtype) / count.clamp(min=1).to(deltas.dtype))  # (K, N...)
    merged = (deltas * changed * factor).sum(dim=0)
    return (origin + merged).to(out_dtype)


def _changes(method: str, base: torch.Tensor, models: Sequence[torch.Tensor],
             epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The base, the task vectors (K, ...), which entries each changed, and how many models changed each."""
    if epsilon < 0:
        raise RecipeError(f"merge method {method!r}: epsilon must be >= 0, got {epsilon}")
    dtype = working_dtype(base.dtype)
    origin = base.to(dtype)
    deltas = torch.stack([m.to(dtype) - origin for m in models])
    changed = deltas.abs() > epsilon
    return origin, deltas, changed, changed.sum(dim=0)
