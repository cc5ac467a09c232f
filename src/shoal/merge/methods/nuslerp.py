"""NuSLERP: SLERP of two models' weights (or task vectors) along rows, columns or the whole tensor."""

from __future__ import annotations

from typing import Sequence

from shoal.checkpoint.lazy_torch import torch
from shoal.merge.methods._inputs import PerModel, check_tensors, per_model, working_dtype
from shoal.merge.registry import merge_method

MERGEKIT_DOCS = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md"
ZERO_SUM = 1e-6  # weights summing to less than this in magnitude: t = 0.5
MIN_NORM = 1e-7  # vectors are divided by max(|v|, MIN_NORM)
COLINEAR = 1e-16  # 1 - cos^2 at most this: linear interpolation instead


@merge_method("nuslerp", needs_base=False, optional_base=True, paper=MERGEKIT_DOCS, min_models=2, max_models=2)
def nuslerp(base: torch.Tensor | None, models: Sequence[torch.Tensor], *, weight: PerModel = 1.0,
            nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False) -> torch.Tensor:
    """NuSLERP: spherical interpolation of two models at t = w_1 / (w_0 + w_1), vector by vector.

    mergekit's docs/merge_methods.md, "NuSLERP", https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md
    With a base, x_k = m_k - base (and base is added back); else x_k = m_k. The vectors are the
    whole tensor (``nuslerp_flatten``), or its slices along dim 0 (``nuslerp_row_wise``), or along
    the last dim. Per vector: theta = arccos(<x_0, x_1> / (|x_0| |x_1|)),
    result = (sin((1-t) theta) x_0 + sin(t theta) x_1) / sin theta; colinear (1 - cos^2 <= 1e-16):
    (1-t) x_0 + t x_1. Weights summing to 0: t = 0.5. Follows mergekit 0.1.5 exactly.
    """
    out_dtype = check_tensors("nuslerp", base, models, needs_base=False, min_models=2, max_models=2)
    w0, w1 = per_model("nuslerp", "weight", weight, 2)
    t = 0.5 if abs(w0 + w1) < ZERO_SUM else w1 / (w0 + w1)
    dtype = working_dtype(out_dtype)
    x0, x1 = models[0].to(dtype), models[1].to(dtype)
    if base is not None:
        x0, x1 = x0 - base.to(dtype), x1 - base.to(dtype)
    result = _slerp_vectors(x0, x1, t, flatten=nuslerp_flatten, along_first=nuslerp_row_wise)
    if base is not None:
        result = result + base.to(dtype)
    return result.to(out_dtype)


def _slerp_vectors(x0: torch.Tensor, x1: torch.Tensor, t: float, *, flatten: bool,
                   along_first: bool) -> torch.Tensor:
    """SLERP of each vector of ``x0`` with the matching one of ``x1``; vectors run along the last dim."""
    shape = x0.shape
    transposed = along_first and not flatten and x0.dim() > 1
    if flatten:
        x0, x1 = x0.reshape(-1), x1.reshape(-1)
    elif transposed:
        x0, x1 = x0.transpose(0, -1), x1.transpose(0, -1)
    u0 = x0 / x0.norm(dim=-1, keepdim=True).clamp(min=MIN_NORM)
    u1 = x1 / x1.norm(dim=-1, keepdim=True).clamp(min=MIN_NORM)
    cosine = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    colinear = (1.0 - cosine * cosine) <= COLINEAR
    theta = torch.arccos(torch.where(colinear, torch.ones_like(cosine), cosine))
    sin_theta = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    arc = (torch.sin((1.0 - t) * theta) * x0 + torch.sin(t * theta) * x1) / sin_theta
    result = torch.where(colinear, (1.0 - t) * x0 + t * x1, arc)
    if transposed:
        result = result.transpose(0, -1)
    return result.reshape(shape)
