"""SLERP in chunks: the dot product and norms first, summed over the fixed blocks of the whole-tensor code.

:func:`~shoal.merge.methods.slerp.block_stats` sums over blocks of ``STATS_BLOCK`` entries,
so chunks cut at multiples of it give the same sums; then the merge pass.
"""

from __future__ import annotations

from typing import Any

import torch

from shoal.merge.chunks import ChunkJob, all_written, finish
from shoal.merge.methods._inputs import working_dtype
from shoal.merge.methods.slerp import STATS_BLOCK, block_stats, slerp_coefficients, sum_block_stats
from shoal.merge.pool import Stage


def slerp_stages(job: ChunkJob) -> Stage | None:
    """The stats pass, then the merge pass (None when the chunks do not fall on the stats blocks)."""
    if any(start % STATS_BLOCK for start, _ in job.ranges):
        return None
    op, sources = job.op, job.sources
    base_ref, model_ref = op.base, op.models[0]
    assert base_ref is not None
    base_dtype = sources.dtype(base_ref)
    dtype = working_dtype(base_dtype)
    t = float(job.kwargs["t"])

    def pair(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return sources.read(base_ref, start, stop).to(dtype), sources.read(model_ref, start, stop).to(dtype)

    def merge_stage(per_range: list[list[Any]]) -> Stage:
        coef_a, coef_b = slerp_coefficients(sum_block_stats([s for part in per_range for s in part]), t)

        def run(start: int, stop: int) -> None:
            a, b = pair(start, stop)
            job.write(start, finish(op, job.spec, (coef_a * a + coef_b * b).to(base_dtype)))

        return Stage(sources.job(run), job.ranges, all_written)

    return Stage(sources.job(lambda start, stop: block_stats(*pair(start, stop))), job.ranges, merge_stage)
