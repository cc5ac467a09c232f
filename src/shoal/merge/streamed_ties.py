"""TIES in the streamed executor: a scan pass for the exact trim thresholds, then the merge pass.

The k-th largest |task vector| of each trimmed model is found as
:class:`~.methods.selection.KthLargest` finds it: a sample of the entries (runs of neighbours,
read up front) brackets the value, the scan pass counts the entries above the bracket and
tallies the distinct values inside it chunk by chunk, and the tallies give the exact value.
Entries equal to it are taken in flat order, as :func:`~.methods.selection.top_k_mask`
does, so the masks are those of the one-tensor code.

With the fused loops (:mod:`~shoal.merge.kernels`) the scan and the merge of a chunk are
one compiled loop each, and the sample, the bracket and the thresholds are computed with
numpy (the same values as the torch code, without its per-call overhead: these steps run
between the passes, once per tensor).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import torch

from shoal.merge.methods._inputs import per_model, working_dtype
from shoal.merge.methods.consensus import task_vector
from shoal.merge.methods.generalized import generalized_task_arithmetic
from shoal.merge.methods.selection import (SAMPLE_SIZE, KthLargest, bracket_positions, sample_positions,
                                          take_first_ties, ties_per_piece)
from shoal.merge.methods.sparsify import apply_keep_mask, trim_count
from shoal.merge.plan import SourceRef, TensorOp
from shoal.merge.pool import Stage
from shoal.merge.streamed import (Sources, Write, all_written, check_sources, finish, fused_merge, kernels_for,
                                  numel, op_params)

SAMPLE_RUN = 1024  # the sample is read as runs of this many neighbouring entries
SAMPLE_ABOVE = 1 << 18  # smaller tensors are scanned without a bracket (the window is all of it)

Ranges = list[tuple[int, int]]
FusedScan = tuple[int, np.ndarray, np.ndarray]  # (count above the bracket, distinct values inside, their counts)


def ties_stages(op: TensorOp, sources: Sources, write: Write, ranges: Ranges, *, compat: str) -> Stage | bool:
    """The passes of a TIES op: the scan (where a model is trimmed), then the merge.

    The sample is read here. The last stage's value is True, or False (nothing written) when
    a bracket missed a threshold: the op must then run whole.
    """
    params = op_params(op)
    count = len(op.models)
    densities = per_model("ties", "density", params["density"], count, low=0.0, high=1.0)
    n = numel(op.shape)
    keep_counts = {k: trim_count(densities[k], n, compat=compat) for k in range(count) if densities[k] < 1.0}
    searched = [k for k, kept in keep_counts.items() if 0 < kept < n]
    kernels = kernels_for(op, sources)
    plan = _Merge(op, sources, write, ranges, params, keep_counts, compat=compat, kernels=kernels)
    if not searched:
        return plan.stage({}, {})
    sample = sample_magnitudes(sources, n) if n >= SAMPLE_ABOVE else [None] * count
    if kernels is not None:
        brackets = {k: bracket(keep_counts[k], n, sample[k]) for k in searched}

        def fused_scan(start: int, stop: int) -> dict[int, FusedScan]:
            return _fused_scan(kernels, sources, brackets, start, stop)

        def fused_thresholds(scans: list[dict[int, FusedScan]]) -> Stage | bool:
            thresholds, taken = {}, {}
            for k in searched:
                found = fused_threshold(keep_counts[k], [scan[k] for scan in scans])
                if found is None:
                    return False
                thresholds[k], taken[k] = found
            return plan.stage(thresholds, taken)

        return Stage(sources.job(fused_scan), ranges, fused_thresholds)

    searches = {k: KthLargest(keep_counts[k], n, None if sample[k] is None else torch.from_numpy(sample[k]))
                for k in searched}

    def scan(start: int, stop: int) -> dict[int, Any]:
        base = sources.base(start, stop)  # the one NaN/Inf check of the sources
        assert base is not None
        work_base = base.to(working_dtype(base.dtype))
        deltas = [task_vector(model, work_base) for model in sources.models(start, stop)]
        return {k: searches[k].scan(deltas[k].abs()) for k in searched}

    def thresholds_of(scans: list[dict[int, Any]]) -> Stage | bool:
        thresholds, taken = {}, {}
        for k in searched:
            per_range = [found[k] for found in scans]
            threshold = searches[k].value(per_range)
            if threshold is None:
                return False
            thresholds[k], taken[k] = threshold, ties_per_piece(per_range, threshold, keep_counts[k])
        return plan.stage(thresholds, taken)

    return Stage(sources.job(scan), ranges, thresholds_of)


class _Merge:
    """The merge pass of a TIES op, once its thresholds are known."""

    def __init__(self, op: TensorOp, sources: Sources, write: Write, ranges: Ranges, params: dict[str, Any],
                 keep_counts: dict[int, int], *, compat: str, kernels: ModuleType | None) -> None:
        self.op, self.sources, self.write, self.ranges = op, sources, write, ranges
        self.params, self.keep_counts, self.compat, self.kernels = params, keep_counts, compat, kernels
        self.weights = per_model("ties", "weight", params["weight"], len(op.models))

    def stage(self, thresholds: dict[int, Any], taken: dict[int, list[int]]) -> Stage:
        """The merge pass: model k keeps its entries above ``thresholds[k]`` and ``taken[k][i]`` ties in range i."""
        index_of = {start: i for i, (start, _) in enumerate(self.ranges)}
        op, sources, write, kernels = self.op, self.sources, self.write, self.kernels
        count, n, keep_counts = len(op.models), numel(op.shape), self.keep_counts
        if kernels is not None:
            threshold_values = np.array([thresholds[k] if k in thresholds
                                         else kernels.KEEP_ALL if k not in keep_counts or keep_counts[k] >= n
                                         else kernels.DROP_ALL for k in range(count)], dtype=np.float32)
            combine = kernels.combine_settings(self.weights, compat=self.compat, normalize=self.params["normalize"],
                                               lambda_=self.params["lambda_"])
            ties_left = [np.array([taken[k][i] if k in thresholds else 0 for k in range(count)], dtype=np.int64)
                         for i in range(len(self.ranges))]

            def fused_job(start: int, stop: int) -> None:
                fused_merge(kernels, op, sources, write, start, stop, kernels.ties_merge,
                            threshold_values, ties_left[index_of[start]], *combine)

            return Stage(sources.job(fused_job), self.ranges, all_written)

        def job(start: int, stop: int) -> None:
            index = index_of[start]

            def sparsify(delta: torch.Tensor, k: int) -> torch.Tensor:
                if k not in keep_counts:
                    return delta
                if k not in thresholds:  # keep all or none
                    return apply_keep_mask(delta, torch.full(delta.shape, keep_counts[k] >= n, dtype=torch.bool))
                magnitude = delta.abs()
                keep = magnitude > thresholds[k]
                take_first_ties(keep, magnitude, thresholds[k], taken[k][index])
                return apply_keep_mask(delta, keep)

            checked = bool(thresholds)  # the scan pass checked the sources for NaN/Inf
            result = generalized_task_arithmetic(
                sources.base(start, stop, check=not checked), sources.models(start, stop, check=not checked),
                method="ties", weights=self.weights,
                sparsify=sparsify, sign_consensus=True, normalize=self.params["normalize"],
                lambda_=self.params["lambda_"], compat=self.compat)
            write(start, finish(op, result))

        return Stage(sources.job(job), self.ranges, all_written)


def sample_magnitudes(sources: Sources, n: int) -> list[np.ndarray]:
    """|task vector| of each model at evenly spread runs of entries (to bracket the thresholds), sorted.

    Read here (a few hundred small reads, cheaper than jobs for the pool); not from a mapping
    of the tensor, where each run's first page would map a large folio around it.
    """
    runs = sample_positions(max(1, n // SAMPLE_RUN), SAMPLE_SIZE // SAMPLE_RUN).tolist()
    bounds = [(start, min(n, start + SAMPLE_RUN))
              for start in (min(run * SAMPLE_RUN, max(0, n - SAMPLE_RUN)) for run in runs)]

    def gather(ref: SourceRef) -> torch.Tensor:
        return sources.readers[ref.model].read_ranges(ref.tensor, bounds)

    assert sources.op.base is not None
    base = gather(sources.op.base)
    work_base = base.to(working_dtype(base.dtype))
    return [np.sort(task_vector(gather(ref), work_base).abs().numpy()) for ref in sources.op.models]


def bracket(k: int, n: int, ordered: np.ndarray | None) -> tuple[np.float32 | None, np.float32 | None]:
    """The bracket ``(lo, hi)`` that ``KthLargest(k, n, sample)`` sets, from the sample sorted (None: open)."""
    if ordered is None or ordered.size == 0:
        return None, None
    i_lo, i_hi = bracket_positions(k, n, ordered.size)
    return (ordered[i_lo] if i_lo >= 0 else None), (ordered[i_hi] if i_hi < ordered.size else None)


def _fused_scan(kernels: ModuleType, sources: Sources, brackets: dict[int, tuple[Any, Any]],
                start: int, stop: int) -> dict[int, FusedScan]:
    """The scan of one range for each searched model, one fused loop each (``KthLargest.scan``)."""
    base = sources.base(start, stop, check=False)
    assert base is not None
    models = sources.models(start, stop, check=False)
    base_values = kernels.as_input(base)
    work = kernels.scratch(base.numel())
    found, finite = {}, True
    for k, (lo, hi) in brackets.items():
        above, distinct, counts, ok = kernels.ties_scan(
            base_values, kernels.as_input(models[k]), np.float32(0.0 if lo is None else lo),
            np.float32(0.0 if hi is None else hi), lo is not None, hi is not None, work)
        finite &= ok
        found[k] = (int(above), distinct, counts)
    if not finite:
        check_sources(sources, start, stop)
    return found


def fused_threshold(k: int, scans: list[FusedScan]) -> tuple[float, list[int]] | None:
    """The k-th largest value and the ties each range keeps, from the scans (None: the bracket missed).

    ``KthLargest.value`` and ``ties_per_piece`` in numpy, with the fused loop's shorthand: -1
    for a range that keeps all its ties.
    """
    above = sum(scan[0] for scan in scans)
    distinct = np.concatenate([scan[1] for scan in scans])
    counts = np.concatenate([scan[2] for scan in scans])
    wanted = k - above  # rank of the k-th largest inside the bracket, from the top
    if wanted <= 0 or wanted > int(counts.sum()):
        return None
    order = np.argsort(distinct, kind="stable")[::-1]
    position = int(np.searchsorted(np.cumsum(counts[order]), wanted))
    threshold = distinct[order[position]]
    missing = k - sum(above + int(counts[distinct > threshold].sum()) for above, distinct, counts in scans)
    taken = []
    for _, distinct, counts in scans:
        tied = int(counts[distinct == threshold].sum())
        here = min(missing, tied)
        taken.append(-1 if here == tied else here)
        missing -= here
    return float(threshold), taken
