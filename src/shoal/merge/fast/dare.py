"""DARE in chunks: with counter-based draws (the default seed contract) every chunk draws its own entries.

A chunk's keep masks are those of the same entries of the whole tensor
(:mod:`shoal.merge.methods.randomness`), so DARE runs as an elementwise method: the torch
function on each chunk, or for DARE-TIES in float32 the fused loop with the masks drawn by
:func:`~.dare_loops.philox_keep`. ``compat: mergekit`` draws from one sequential generator
per tensor (and may rescale by whole-tensor L1 norms): those ops run whole.
"""

from __future__ import annotations

import numpy as np

from shoal.merge.chunks import ChunkJob, all_written, elementwise, fused_merge
from shoal.merge.methods._inputs import per_model
from shoal.merge.methods.randomness import EntryRandom, keep_threshold
from shoal.merge.pool import Stage


def dare_linear_stages(job: ChunkJob) -> Stage | None:
    """DARE with task arithmetic: elementwise under counter-based draws, else None (run whole)."""
    return elementwise(job) if isinstance(job.kwargs.get("generator"), EntryRandom) else None


def dare_ties_stages(job: ChunkJob) -> Stage | None:
    """DARE-TIES: the fused loop where it can run, else elementwise torch chunks; None (run whole) for mergekit's draws."""
    random = job.kwargs.get("generator")
    if not isinstance(random, EntryRandom):
        return None
    kernels = job.float32_kernels()
    if kernels is None:
        return elementwise(job)
    kwargs, op = job.kwargs, job.op
    count = len(op.models)
    weights = per_model(op.method, "weight", kwargs["weight"], count)
    densities = per_model(op.method, "density", kwargs["density"], count, low=0.0, high=1.0)
    normalize = kwargs["normalize"]
    if normalize is None:
        normalize = job.compat != "mergekit"
    rescale = kwargs["rescale"]
    # None: kept whole (no draws); 0: dropped whole
    thresholds = [None if d >= 1.0 else 0 if d <= 0.0 else keep_threshold(d) for d in densities]
    divisors = np.array([d if rescale and 0.0 < d < 1.0 else 1.0 for d in densities], dtype=np.float32)
    combine = kernels.combine_settings(weights, compat=job.compat, normalize=normalize, lambda_=kwargs["lambda_"])
    n = 1
    for dim in op.shape:
        n *= dim
    ranges = [(start, min(n, start + job.fused_chunk)) for start in range(0, n, job.fused_chunk)] or [(0, 0)]

    def run(start: int, stop: int) -> None:
        keep = kernels.keep_masks(random.key, random.start + start, stop - start, thresholds)
        fused_merge(job, kernels, start, stop, kernels.dare_merge, keep, divisors, *combine)

    return Stage(job.sources.job(run), ranges, all_written)
