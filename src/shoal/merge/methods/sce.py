"""SCE (FuseChat): keep entries where models disagree most, weight models by energy, erase minority signs."""

from __future__ import annotations

from typing import Sequence

from shoal.checkpoint.lazy_torch import torch
from shoal.errors import RecipeError
from shoal.merge.methods._inputs import Compat, check_compat, check_tensors, working_dtype
from shoal.merge.registry import merge_method

PAPER = "https://arxiv.org/abs/2408.07990"
TINY = 1e-6  # summed weights below this: equal weights; per-entry weight sums are floored at it


@merge_method("sce", needs_base=True, paper=PAPER)
def sce(base: torch.Tensor, models: Sequence[torch.Tensor], *, select_topk: float = 1.0,
        compat: Compat = "paper") -> torch.Tensor:
    """SCE: Select (top variance across models), Calculate (weights from energy), Erase (minority signs).

    Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", https://arxiv.org/abs/2408.07990
    delta_k = m_k - base; keep the ``select_topk`` share (of the non-zero variances) of entries with the
    largest variance of delta_k across models, zero the rest; w_k = mean(delta_k^2) / sum_j mean(delta_j^2)
    (equal weights when that sum is below 1e-6); s = sign(sum_k delta_k) (0 counts as +);
    result = base + sum_k w_k [sign delta_k = s] delta_k / max(sum_k w_k [sign delta_k = s], 1e-6).
    Follows mergekit 0.1.5's rules (its top-k keeps int(share * non-zero count) entries). shoal
    computes in float32; ``compat="mergekit"`` computes every step in the tensors' own dtype as
    mergekit does, so that under bf16 the same entries win the variance ranking (in float32 and
    in bf16 the top-variance pick differs on 1-2% of entries).
    """
    check_compat("sce", compat)
    out_dtype = check_tensors("sce", base, models, needs_base=True, min_models=1)
    if not 0.0 <= select_topk <= 1.0:
        raise RecipeError(f"merge method 'sce': select_topk must lie in [0, 1], got {select_topk}")
    dtype = out_dtype if compat == "mergekit" else working_dtype(out_dtype)
    origin = base.to(dtype)
    deltas = torch.stack([m.to(dtype) - origin for m in models]).reshape(len(models), -1)  # (K, N)
    if select_topk < 1.0:
        deltas = deltas * _select_by_variance(deltas, select_topk)[None, :]
    energy = deltas.square().mean(dim=1)  # (K,)
    total = float(energy.sum())
    weights = torch.full_like(energy, 1.0 / len(models)) if abs(total) < TINY else energy / total
    majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(dtype)
    agreeing = weights[:, None] * (torch.sign(deltas) == majority[None, :])  # (K, N)
    merged = (deltas * agreeing).sum(dim=0) / agreeing.sum(dim=0).clamp(min=TINY)
    return (origin + merged.reshape(base.shape)).to(out_dtype)


def _select_by_variance(deltas: torch.Tensor, share: float) -> torch.Tensor:
    """1.0 on the int(share * #non-zero) entries whose task vectors vary most across models, else 0.0."""
    variance = deltas.var(dim=0, unbiased=False)
    mask = torch.zeros_like(variance)
    count = int(int(torch.count_nonzero(variance)) * share)
    if count > 0:
        mask[torch.topk(variance.abs(), count, largest=True).indices] = 1.0
    return mask
