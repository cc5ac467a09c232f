"""Passthrough in chunks: a tensor passed through unscaled is copied as stored bits (no torch), else elementwise."""

from __future__ import annotations

from shoal.merge.chunks import ChunkJob, copy_chunks, elementwise
from shoal.merge.methods._inputs import per_model
from shoal.merge.pool import Stage


def passthrough_stages(job: ChunkJob) -> Stage:
    """``scale`` 1 returns the model's tensor itself, so its chunks are those of a copy (checked for NaN/Inf
    by the reader, as the method's inputs are); any other scale multiplies in torch chunks."""
    (factor,) = per_model("passthrough", "scale", job.kwargs["scale"], 1)
    if factor == 1.0 and job.op.compute_dtype is None:
        return copy_chunks(job.op, job.sources, job.write, job.ranges)
    return elementwise(job)
