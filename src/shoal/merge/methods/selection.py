"""Exact top-k selection by magnitude: the one place that decides which entries are largest.

Trimming (TIES) and the breadcrumbs band both call :func:`top_k_mask`; a faster selection
can replace it here without touching the methods.
"""

from __future__ import annotations

import math

import torch


def count_for_fraction(fraction: float, n: int, *, floor: bool = False) -> int:
    """How many of ``n`` entries a ``fraction`` means: the nearest integer (halves up), or the floor."""
    scaled = fraction * n
    k = math.floor(scaled) if floor else math.floor(scaled + 0.5)
    return max(0, min(n, k))


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` entries of ``scores``: the largest ones.

    Entries equal to the k-th largest value are taken in flat index order (lowest first), so
    the result is deterministic and masks for k1 < k2 are nested. Uses a k-th value selection
    (``torch.kthvalue``), not a full sort.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    threshold = torch.kthvalue(flat, n - k + 1).values  # the k-th largest value
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        tied = torch.nonzero(flat == threshold).squeeze(1)[:missing]  # ascending flat indices
        mask[tied] = True
    return mask.reshape(scores.shape)
