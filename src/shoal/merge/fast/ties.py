"""TIES in chunks with the fused loops: a scan pass for the exact trim thresholds, then the merge pass.

The k-th largest |task vector| of each trimmed model is found as
:func:`~shoal.merge.methods.selection.top_k_mask` finds it on a whole tensor: a sample of
the entries (runs of neighbours, read up front) brackets the value, the scan pass counts the
entries above the bracket and tallies the distinct values inside it chunk by chunk
(:func:`~.ties_loops.ties_scan`), and :func:`~shoal.merge.methods.selection.kth_in_tallies`
gives the exact value. Entries equal to it are taken in flat order, so the masks are those
of the whole-tensor code. Without numba, TIES runs whole (the reference).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from shoal.checkpoint.dtypes import as_float32
from shoal.merge.chunks import ChunkJob, Ranges, Sources, all_written, fused_merge
from shoal.merge.methods._inputs import per_model
from shoal.merge.methods.selection import (SAMPLE_SIZE, bracket_values, kth_in_tallies, sample_positions,
                                          ties_taken)
from shoal.merge.methods.sparsify import trim_count
from shoal.merge.plan import SourceRef
from shoal.merge.pool import Stage

SAMPLE_RUN = 1024  # the sample is read as runs of this many neighbouring entries
SAMPLE_ABOVE = 1 << 18  # smaller tensors are scanned without a bracket (the window is all of it)

FusedScan = tuple[int, np.ndarray, np.ndarray]  # (count above the bracket, distinct values inside, their counts)


def ties_stages(job: ChunkJob) -> Stage | None:
    """The passes of a TIES op: the scan (where a model is trimmed), then the merge; None without the fused loops.

    The last stage's value is True, or False (nothing written) when a bracket missed a
    threshold: the op then runs whole.
    """
    kernels = job.float32_kernels()
    if kernels is None or job.kwargs.get("rescale"):  # rescaling needs each whole trimmed vector: runs whole
        return None
    job = job.with_ranges(_fused_ranges(job))
    kwargs, op, sources = job.kwargs, job.op, job.sources
    count = len(op.models)
    compat = job.compat
    densities = per_model("ties", "density", kwargs["density"], count, low=0.0, high=1.0)
    weights = per_model("ties", "weight", kwargs["weight"], count)
    n = _numel(op.shape)
    keep_counts = {k: trim_count(densities[k], n, compat=compat) for k in range(count) if densities[k] < 1.0}
    searched = [k for k, kept in keep_counts.items() if 0 < kept < n]
    combine = kernels.combine_settings(weights, compat=compat, normalize=kwargs["normalize"],
                                       lambda_=kwargs["lambda_"])

    def merge_stage(thresholds: dict[int, float], taken: dict[int, list[int]]) -> Stage:
        values = np.array([thresholds[k] if k in thresholds
                           else kernels.KEEP_ALL if k not in keep_counts or keep_counts[k] >= n
                           else kernels.DROP_ALL for k in range(count)], dtype=np.float32)
        ties_left = [np.array([taken[k][i] if k in thresholds else 0 for k in range(count)], dtype=np.int64)
                     for i in range(len(job.ranges))]
        index_of = {start: i for i, (start, _) in enumerate(job.ranges)}

        def run(start: int, stop: int) -> None:
            fused_merge(job, kernels, start, stop, kernels.ties_merge, values, ties_left[index_of[start]], *combine)

        return Stage(sources.job(run), job.ranges, all_written)

    if not searched:
        return merge_stage({}, {})
    sample = _sample_magnitudes(sources, n) if n >= SAMPLE_ABOVE else [None] * count
    brackets = {k: (bracket_values(keep_counts[k], n, sample[k]) if sample[k] is not None else (None, None))
                for k in searched}

    def scan(start: int, stop: int) -> dict[int, FusedScan]:
        return _fused_scan(kernels, sources, brackets, start, stop)

    def thresholds_of(scans: list[dict[int, FusedScan]]) -> Stage | bool:
        thresholds, taken = {}, {}
        for k in searched:
            per_range = [found[k] for found in scans]
            index = kth_in_tallies(keep_counts[k], sum(s[0] for s in per_range),
                                   np.concatenate([s[1] for s in per_range]),
                                   np.concatenate([s[2] for s in per_range]))
            if index is None:
                return False
            threshold = np.concatenate([s[1] for s in per_range])[index]
            thresholds[k] = float(threshold)
            # the loop's shorthand: -1 for a range that keeps all its ties
            taken[k] = [-1 if here == tied else here for here, tied in ties_taken(keep_counts[k], per_range, threshold)]
        return merge_stage(thresholds, taken)

    return Stage(sources.job(scan), job.ranges, thresholds_of)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _fused_ranges(job: ChunkJob) -> Ranges:
    n = _numel(job.op.shape)
    chunk = job.fused_chunk
    return [(start, min(n, start + chunk)) for start in range(0, n, chunk)] or [(0, 0)]


def _sample_magnitudes(sources: Sources, n: int) -> list[np.ndarray]:
    """|task vector| of each model at evenly spread runs of entries (to bracket the thresholds), sorted.

    Read with ``pread`` (a few hundred small reads), not from a mapping of the tensor, where
    each run's first page would map a large folio around it.
    """
    runs = sample_positions(max(1, n // SAMPLE_RUN), SAMPLE_SIZE // SAMPLE_RUN).tolist()
    bounds = [(start, min(n, start + SAMPLE_RUN))
              for start in (min(run * SAMPLE_RUN, max(0, n - SAMPLE_RUN)) for run in runs)]

    def gather(ref: SourceRef) -> np.ndarray:  # widened to float32, the working dtype, as the method's task vectors
        reader = sources.readers[ref.model]
        return as_float32(reader.read_array(ref.tensor, bounds), reader.dtype_name(ref.tensor))

    assert sources.op.base is not None
    base = gather(sources.op.base)
    return [np.sort(np.abs(gather(ref) - base)) for ref in sources.op.models]


def _fused_scan(kernels: ModuleType, sources: Sources, brackets: dict[int, tuple[Any, Any]],
                start: int, stop: int) -> dict[int, FusedScan]:
    """The scan of one range for each searched model, one fused loop each (``KthLargest.scan``)."""
    assert sources.op.base is not None
    base_values = kernels.loop_input(*sources.array(sources.op.base, start, stop))
    models = sources.op.models
    work = kernels.scratch(base_values.size)
    found, finite = {}, True
    for k, (lo, hi) in brackets.items():
        above, distinct, counts, ok = kernels.ties_scan(
            base_values, kernels.loop_input(*sources.array(models[k], start, stop)), np.float32(0.0 if lo is None else lo),
            np.float32(0.0 if hi is None else hi), lo is not None, hi is not None, work)
        finite &= ok
        found[k] = (int(above), distinct, counts)
    if not finite:
        sources.check(start, stop)
    return found
