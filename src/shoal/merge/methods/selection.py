"""Exact top-k selection by magnitude: the one place that decides which entries are largest.

Trimming (TIES) and the breadcrumbs band both call :func:`top_k_mask`. The k-th largest
value is found without a full sort and without ``torch.kthvalue`` over the whole tensor
(a single-threaded quickselect, the slowest step of a TIES merge): a small sample of the
entries brackets the value, one multithreaded pass counts the entries above the bracket and
tallies the distinct values inside it, and the tally gives the value. The value found is
the exact k-th largest whatever the sample; a bracket that misses (very unlikely) is widened
to everything. :class:`KthLargest` does the same over a tensor seen in pieces.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from shoal.checkpoint.lazy_torch import torch

SAMPLE_SIZE = 1 << 16  # entries sampled to bracket the k-th largest value
_DIRECT_BELOW = 1 << 18  # smaller tensors: kthvalue on all of it
_MARGIN_SIGMAS = 6.0


def count_for_fraction(fraction: float, n: int, *, floor: bool = False) -> int:
    """How many of ``n`` entries a ``fraction`` means: the nearest integer (halves up), or the floor."""
    scaled = fraction * n
    k = math.floor(scaled) if floor else math.floor(scaled + 0.5)
    return max(0, min(n, k))


def sample_positions(n: int, count: int = SAMPLE_SIZE) -> np.ndarray:
    """``count`` evenly spread flat positions in ``[0, n)`` (all of them when ``n <= count``), as int64."""
    if n <= count:
        return np.arange(n, dtype=np.int64)
    return np.arange(count, dtype=np.int64) * n // count


Scan = tuple[int, "torch.Tensor", "torch.Tensor"]  # (count above the bracket, distinct values inside, their counts)


def bracket_positions(k: int, n: int, size: int) -> tuple[int, int]:
    """Positions in a sorted sample of ``size`` of ``n`` values that bracket the k-th largest.

    A position below 0 or at ``size`` and beyond means that side stays open.
    """
    below = (n - k) / n  # fraction of the values below the k-th largest
    margin = _MARGIN_SIGMAS * math.sqrt(max(below * (1 - below), 1.0 / size) / size) + 2.0 / size
    return math.floor((below - margin) * size), math.ceil((below + margin) * size)


def bracket_values(k: int, n: int, ordered: Any) -> tuple[Any, Any]:
    """The bracket ``(lo, hi)`` of the k-th largest of ``n`` values from a sorted sample of them (None: open)."""
    size = len(ordered)
    if size == 0:
        return None, None
    i_lo, i_hi = bracket_positions(k, n, size)
    return (ordered[i_lo] if i_lo >= 0 else None), (ordered[i_hi] if i_hi < size else None)


def kth_in_tallies(k: int, above: int, distinct: np.ndarray, counts: np.ndarray) -> int | None:
    """Where the k-th largest is in ``distinct`` (the tallied values inside a bracket; ``above`` lie over it).

    The one k-th-largest rule, for the whole-tensor scan and the fused loops alike. None when
    the bracket missed it.
    """
    wanted = k - above  # rank of the k-th largest inside the bracket, from the top
    if wanted <= 0 or wanted > int(counts.sum()):
        return None
    order = np.argsort(distinct, kind="stable")[::-1]
    return int(order[int(np.searchsorted(np.cumsum(counts[order]), wanted))])


def ties_taken(k: int, scans: Sequence[tuple[int, np.ndarray, np.ndarray]], threshold: Any) -> list[tuple[int, int]]:
    """(entries equal to ``threshold`` each piece keeps, how many it has), so that exactly ``k`` are kept.

    Entries above the threshold are all kept and ties go to the lowest flat indices, piece by piece.
    """
    missing = k - sum(above + int(counts[distinct > threshold].sum()) for above, distinct, counts in scans)
    taken = []
    for _, distinct, counts in scans:
        tied = int(counts[distinct == threshold].sum())
        here = min(missing, tied)
        taken.append((here, tied))
        missing -= here
    return taken


class KthLargest:
    """The exact k-th largest of ``n`` values seen in pieces.

    ``sample`` (some of the values) sets a bracket [lo, hi]. :meth:`scan` of a piece counts
    its values above ``hi`` and tallies the distinct values inside the bracket (pieces may be
    scanned in parallel; a tally stays small even when half-precision data puts thousands of
    equal values in the bracket); :meth:`value` of all the scans is the k-th largest value,
    or None when the bracket missed it (scan again with ``sample=None``: the bracket is then
    unbounded).
    """

    def __init__(self, k: int, n: int, sample: torch.Tensor | None) -> None:
        if not 0 < k <= n:
            raise ValueError(f"k must lie in [1, {n}], got {k}")
        self.k, self.n = k, n
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        if sample is not None:
            self.lo, self.hi = bracket_values(k, n, sample.reshape(-1).sort().values)

    def scan(self, values: torch.Tensor) -> Scan:
        """(how many of ``values`` lie above the bracket, the distinct values inside it, their counts)."""
        values = values.reshape(-1)
        above = 0
        if self.hi is None:
            inside = values[values >= self.lo] if self.lo is not None else values
        else:
            above = int(torch.count_nonzero(values > self.hi))
            mask = values <= self.hi
            if self.lo is not None:
                mask &= values >= self.lo
            inside = values[mask]
        distinct, counts = torch.unique(inside, sorted=True, return_counts=True)
        return above, distinct, counts

    def value(self, scans: Sequence[Scan]) -> torch.Tensor | None:
        distinct = torch.cat([scan[1] for scan in scans])
        counts = torch.cat([scan[2] for scan in scans])
        # float64 holds every value of the narrower dtypes exactly, in the same order
        index = kth_in_tallies(self.k, sum(scan[0] for scan in scans), distinct.to(torch.float64).cpu().numpy(),
                               counts.cpu().numpy())
        return None if index is None else distinct[index]


def kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of the 1-d tensor ``flat`` (``1 <= k <= numel``), as a 0-d tensor."""
    n = flat.numel()
    if n < _DIRECT_BELOW:
        return torch.kthvalue(flat, n - k + 1).values
    sample = flat[torch.from_numpy(sample_positions(n)).to(flat.device)]
    search = KthLargest(k, n, sample)
    found = search.value([search.scan(flat)])
    if found is None:
        return torch.kthvalue(flat, n - k + 1).values
    return found


def take_first_ties(mask: torch.Tensor, values: torch.Tensor, threshold: torch.Tensor, count: int) -> int:
    """Set ``mask`` at the first ``count`` entries of ``values`` equal to ``threshold`` (flat order).

    Both are 1-d. Returns how many were set.
    """
    if count <= 0:
        return 0
    tied = torch.nonzero(values == threshold).squeeze(1)[:count]  # ascending flat indices
    mask[tied] = True
    return int(tied.numel())


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` entries of ``scores``: the largest ones.

    Entries equal to the k-th largest value are taken in flat index order (lowest first), so
    the result is deterministic and masks for k1 < k2 are nested.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    threshold = kth_largest(flat, k)
    mask = flat > threshold
    take_first_ties(mask, flat, threshold, k - int(mask.sum()))
    return mask.reshape(scores.shape)
