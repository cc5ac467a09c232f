"""Model Stock: move from the base towards the average of the fine-tunes by an angle-derived ratio."""

from __future__ import annotations

from typing import Sequence

from shoal.checkpoint.lazy_torch import torch
from shoal.merge.methods._inputs import Compat, check_compat, check_tensors, working_dtype
from shoal.merge.registry import merge_method

_MERGEKIT_NORM_FLOOR = 1e-6
_DEGENERATE = 1e-6


def average_pairwise_cosine(task_vectors: Sequence[torch.Tensor], *,
                            compat: Compat = "paper") -> torch.Tensor:
    """Mean cosine over all pairs of task vectors, per row (reduced over the last dimension).

    A zero task vector has cosine 0 with everything. mergekit floors the norm product at 1e-6
    and clips to [-1, 1].
    """
    cosines = []
    for i in range(len(task_vectors)):
        for j in range(i + 1, len(task_vectors)):
            a, b = task_vectors[i], task_vectors[j]
            dot = (a * b).sum(dim=-1)
            norms = a.norm(dim=-1) * b.norm(dim=-1)
            if compat == "mergekit":
                cosine = dot / norms.clamp(min=_MERGEKIT_NORM_FLOOR)
            else:
                cosine = torch.where(norms > 0, dot / norms.masked_fill(norms == 0, 1.0), 0.0)
            cosines.append(cosine.clamp(-1.0, 1.0))
    return torch.stack(cosines).mean(dim=0)


@merge_method("model_stock", needs_base=True, paper="https://arxiv.org/abs/2403.19522", min_models=2)
def model_stock(base: torch.Tensor, models: Sequence[torch.Tensor], *, filter_wise: bool = False,
                compat: Compat = "paper") -> torch.Tensor:
    """Model Stock: move from the base towards the fine-tunes' average by a ratio set by their angle.

    Jang et al. 2024, "Model Stock", https://arxiv.org/abs/2403.19522
    cos = mean pairwise cosine of the task vectors m_k - base;  t = k cos / (1 + (k-1) cos)
    result = t * mean_k(m_k) + (1 - t) * base   (``filter_wise``: one t per row, else one per tensor)
    """
    check_compat("model_stock", compat)
    out_dtype = check_tensors("model_stock", base, models, needs_base=True, min_models=2)
    dtype = working_dtype(out_dtype)
    if filter_wise and base.dim() > 0:
        rows = (-1, base.shape[-1])
    else:
        rows = (1, -1)
    w0 = base.to(dtype).reshape(rows)
    ws = [m.to(dtype).reshape(rows) for m in models]
    k = len(ws)
    cosine = average_pairwise_cosine([w - w0 for w in ws], compat=compat).unsqueeze(-1)
    denominator = 1.0 + (k - 1) * cosine
    if compat == "mergekit":
        ratio = k * cosine / denominator
    else:
        # the mean cosine is >= -1/(k-1); at that bound the task vectors cancel and t is undefined
        degenerate = denominator < _DEGENERATE
        ratio = torch.where(degenerate, 0.0, k * cosine / denominator.masked_fill(degenerate, 1.0))
    average = torch.stack(ws).mean(dim=0)
    return (ratio * average + (1.0 - ratio) * w0).reshape(base.shape).to(out_dtype)
