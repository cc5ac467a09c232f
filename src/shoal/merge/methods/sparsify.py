"""Sparsifying a task vector: the first stage of TIES, DARE, DELLA and Breadcrumbs.

Every function takes a task vector that the caller owns (it may be modified in place; use
the returned tensor) and keeps a ``density`` fraction of it:

- :func:`trim_by_magnitude` (TIES): exactly the largest-magnitude entries;
- :func:`drop_random` (DARE): each entry independently with probability ``density``;
- :func:`drop_by_magnitude_rank` (DELLA): with a probability that grows with the entry's
  magnitude rank in its row;
- :func:`trim_outliers` (Breadcrumbs): a band of magnitudes, without the largest ``gamma``.

``compat="mergekit"`` switches counting (floor instead of nearest) and rescaling (keep the
L1 norm of the task vector instead of dividing by the keep probability) to mergekit's.
"""

from __future__ import annotations

from shoal.checkpoint.lazy_torch import torch
from shoal.merge.methods._inputs import Compat, Randomness, keep_mask
from shoal.merge.methods.selection import count_for_fraction, top_k_mask

_L1_EPS = 1e-7


def trim_count(density: float, n: int, *, compat: Compat = "paper") -> int:
    """How many of ``n`` entries :func:`trim_by_magnitude` keeps (for ``density < 1``)."""
    return count_for_fraction(density, n, floor=compat == "mergekit")


def trim_by_magnitude(delta: torch.Tensor, density: float, *, compat: Compat = "paper",
                      rescale: bool = False) -> torch.Tensor:
    """Keep the ``round(density * n)`` largest-magnitude entries of ``delta``, zero the rest.

    ``rescale``: the kept entries are scaled to the L1 norm of ``delta`` (mergekit's option).
    """
    if density >= 1.0:
        return delta
    magnitude = delta.abs()
    l1_before = magnitude.sum() if rescale else None
    keep = top_k_mask(magnitude, trim_count(density, delta.numel(), compat=compat))
    trimmed = apply_keep_mask(delta, keep)
    return rescale_to_l1(trimmed, l1_before) if l1_before is not None else trimmed


def apply_keep_mask(delta: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero ``delta`` (in place) where ``keep`` is false; the one way every sparsifier drops entries.

    A multiplication by the mask (the fused loops multiply too, so both paths give the same
    zeros); a dropped negative entry becomes -0.0, which every later sum treats as 0.
    """
    return delta.mul_(keep)


def trim_outliers(delta: torch.Tensor, density: float, gamma: float, *, rescale: bool = False,
                  compat: Compat = "paper") -> torch.Tensor:
    """Drop the largest ``gamma`` fraction and the smallest entries, keeping a ``density`` fraction.

    When ``density + gamma`` exceeds 1 fewer large entries are dropped, so that ``density``
    is still kept. ``rescale``: the kept entries are scaled to the L1 norm of ``delta``.
    """
    if density >= 1.0:
        return delta
    n = delta.numel()
    floor = compat == "mergekit"
    n_keep = count_for_fraction(density, n, floor=floor)
    n_top = min(count_for_fraction(gamma, n, floor=floor), n - n_keep)
    magnitude = delta.abs()
    keep = top_k_mask(magnitude, n_top + n_keep)
    if n_top > 0:
        keep &= ~top_k_mask(magnitude, n_top)
    l1_before = magnitude.sum() if rescale else None
    delta.masked_fill_(~keep, 0.0)
    return rescale_to_l1(delta, l1_before) if l1_before is not None else delta


def drop_random(delta: torch.Tensor, density: float, generator: Randomness, *, model: int = 0,
                rescale: bool = True, compat: Compat = "paper") -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale the survivors by ``1/density``.

    The keep mask is :func:`~._inputs.keep_mask` of model ``model`` (no draws when ``density``
    is 0 or 1).
    """
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return delta.zero_()
    keep = keep_mask(delta, density, generator, model)
    l1_before = delta.abs().sum() if rescale and compat == "mergekit" else None
    apply_keep_mask(delta, keep)
    if not rescale:
        return delta
    if l1_before is not None:
        return rescale_to_l1(delta, l1_before)
    return delta.div_(density)


def magnitude_rank_keep_probability(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probabilities, shaped ``(rows, last dim)``.

    Entries are ranked by magnitude within each row (the last dimension; a vector is one
    row), ascending, ties by index; rank r of n maps linearly onto
    ``[density - epsilon, density + epsilon]`` and the result is clipped to [0, 1].
    """
    rows = delta.reshape(-1, delta.shape[-1]) if delta.dim() > 0 else delta.reshape(1, 1)
    n = rows.shape[1]
    if n == 1:
        position = torch.full(rows.shape, 0.5, dtype=torch.float32, device=rows.device)
    else:
        order = torch.argsort(rows.abs(), dim=1, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(n, device=rows.device).expand_as(order))
        position = rank.to(torch.float32) / (n - 1)
    return (density - epsilon + 2.0 * epsilon * position).clamp_(0.0, 1.0)


def drop_by_magnitude_rank(delta: torch.Tensor, density: float, epsilon: float,
                           generator: Randomness, *, model: int = 0, rescale: bool = True,
                           compat: Compat = "paper") -> torch.Tensor:
    """DELLA's MAGPRUNE: keep entry i with a probability p_i rising with its magnitude rank, rescale by 1/p_i.

    The keep mask is :func:`~._inputs.keep_mask` of model ``model`` with p (as :func:`drop_random`).
    """
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return delta.zero_()
    keep_probability = magnitude_rank_keep_probability(delta, density, epsilon)
    rows = delta.reshape(keep_probability.shape)
    keep = keep_mask(delta, keep_probability, generator, model).reshape(rows.shape)
    l1_before = rows.abs().sum() if rescale and compat == "mergekit" else None
    rows.masked_fill_(~keep, 0.0)
    if rescale:
        if l1_before is not None:
            rows = rescale_to_l1(rows, l1_before)
        else:
            # a kept entry has p_i > 0; dropped entries are zero whatever they are divided by
            rows.div_(keep_probability.masked_fill_(~keep, 1.0).to(rows.dtype))
    return rows.reshape(delta.shape)


def rescale_to_l1(sparse: torch.Tensor, l1_before: torch.Tensor) -> torch.Tensor:
    """mergekit's rescaling: multiply ``sparse`` so its L1 norm equals the dense vector's."""
    l1_after = sparse.abs().sum()
    if float(l1_before) < _L1_EPS or float(l1_after) < _L1_EPS:
        return sparse
    return sparse.mul_(l1_before / l1_after)
