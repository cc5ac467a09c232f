"""Multi-SLERP: a weighted average of many models taken on the hypersphere, not in the plane."""

from __future__ import annotations

from typing import Sequence

from shoal.checkpoint.lazy_torch import torch
from shoal.errors import MergeError, RecipeError
from shoal.merge.methods._inputs import PerModel, check_tensors, per_model, working_dtype
from shoal.merge.registry import merge_method

PAPER = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"


@merge_method("multislerp", needs_base=False, optional_base=True, paper=PAPER, min_models=1)
def multislerp(base: torch.Tensor | None, models: Sequence[torch.Tensor], *, weight: PerModel = 1.0,
               normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Multi-SLERP: barycentric interpolation on the sphere through the tangent space at the weighted mean.

    Goddard, "Multi-SLERP", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea (mergekit's "multislerp")
    x_k = m_k (- base), u_k = x_k / (|x_k| + eps), w normalized to sum 1 (``normalize_weights``);
    mu = sum w_k u_k / |sum w_k u_k|;  v = sum w_k (u_k - <u_k, mu> mu);
    result = (cos|v| mu + sin|v| v / |v|) * sum w_k |x_k|  (+ base), with |v| taken as |v| + eps.
    One model: itself. A zero weighted mean of the directions: linear for two models, an error
    for more; when every x_k is zero the result is the base (mergekit stops with an error there).
    Otherwise follows mergekit 0.1.5 exactly.
    """
    out_dtype = check_tensors("multislerp", base, models, needs_base=False, min_models=1)
    weights_list = per_model("multislerp", "weight", weight, len(models))
    if len(models) == 1:
        return models[0].to(out_dtype)
    dtype = working_dtype(out_dtype)
    shape = models[0].shape
    points = torch.stack([m.to(dtype).reshape(-1) for m in models])  # (K, N)
    if base is not None:
        points = points - base.to(dtype).reshape(1, -1)
    weights = torch.tensor(weights_list, dtype=dtype, device=points.device)
    if normalize_weights:
        total = float(weights.sum())
        if abs(total) < 1e-8:
            raise RecipeError(f"merge method 'multislerp': the weights {weights_list} sum to 0, so they cannot "
                              "be normalized (set normalize_weights: false)")
        weights = weights / total
    norms = points.norm(dim=1, keepdim=True)  # (K, 1)
    if not bool((norms > 0).any()):
        return (base if base is not None else models[0]).to(out_dtype)
    units = points / (norms + eps)
    mean = (weights[:, None] * units).sum(dim=0)
    mean_norm = float(mean.norm())
    if mean_norm < eps:
        if len(models) != 2:
            raise MergeError("merge method 'multislerp': the weighted directions of the models cancel out "
                             "(antipodal models with balancing weights); choose other weights")
        result = weights[0] * points[0] + weights[1] * points[1]
    else:
        mean = mean / mean_norm
        tangents = units - (units @ mean)[:, None] * mean[None, :]
        step = (weights[:, None] * tangents).sum(dim=0)
        step_norm = step.norm() + eps
        result = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
        result = result * (weights * norms[:, 0]).sum()
    if base is not None:
        result = result + base.to(dtype).reshape(-1)
    return result.reshape(shape).to(out_dtype)
