"""SLERP: spherical linear interpolation between the base and one other model."""

from __future__ import annotations

import math
from typing import Sequence

from shoal.checkpoint.lazy_torch import torch
from shoal.merge.methods._inputs import check_tensors, working_dtype
from shoal.merge.registry import merge_method

COLINEAR_COSINE = 0.9995  # above this |cos|, the angle is too small to divide by sin(angle)
_ZERO_NORM = 1e-8
STATS_BLOCK = 1 << 16  # dot products and norms are summed in float64 over blocks of this many entries


@merge_method("slerp", needs_base=True, paper="https://doi.org/10.1145/325165.325242",
              min_models=1, max_models=1,
              chunked="shoal.merge.fast.slerp:slerp_stages")
def slerp(base: torch.Tensor, models: Sequence[torch.Tensor], *, t: float = 0.5) -> torch.Tensor:
    """SLERP: walk the arc from the base (t=0) to the other model (t=1), the tensor as one vector.

    Shoemake 1985, "Animating rotation with quaternion curves", https://doi.org/10.1145/325165.325242
    omega = arccos(<a, b> / (|a| |b|));  result = sin((1-t) omega)/sin(omega) a + sin(t omega)/sin(omega) b
    Nearly colinear vectors (|cos omega| > 0.9995) or a zero vector: linear (1-t) a + t b.
    """
    out_dtype = check_tensors("slerp", base, models, needs_base=True, min_models=1, max_models=1)
    dtype = working_dtype(out_dtype)
    a = base.to(dtype).reshape(-1)
    b = models[0].to(dtype).reshape(-1)
    coef_a, coef_b = slerp_coefficients(sum_block_stats(block_stats(a, b)), t)
    return (coef_a * a + coef_b * b).reshape(base.shape).to(out_dtype)


def block_stats(a: torch.Tensor, b: torch.Tensor) -> list[tuple[float, float, float]]:
    """``(<a, b>, |a|^2, |b|^2)`` of each ``STATS_BLOCK``-entry block of the flat vectors, in float64.

    Fixed blocks make the sums independent of how the vectors are split: the stats of a
    vector cut at multiples of ``STATS_BLOCK`` are the concatenation of its pieces' stats.
    """
    stats = []
    for start in range(0, a.numel(), STATS_BLOCK):
        a64 = a[start:start + STATS_BLOCK].to(torch.float64)
        b64 = b[start:start + STATS_BLOCK].to(torch.float64)
        stats.append((float((a64 * b64).sum()), float((a64 * a64).sum()), float((b64 * b64).sum())))
    return stats


def sum_block_stats(stats: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    dot = norm_a_sq = norm_b_sq = 0.0
    for block_dot, block_a, block_b in stats:  # in block order, so the sum does not depend on threads
        dot += block_dot
        norm_a_sq += block_a
        norm_b_sq += block_b
    return dot, norm_a_sq, norm_b_sq


def slerp_coefficients(stats: tuple[float, float, float], t: float) -> tuple[float, float]:
    """The weights of a and b from ``(<a, b>, |a|^2, |b|^2)``."""
    dot, norm_a_sq, norm_b_sq = stats
    norm_a, norm_b = math.sqrt(norm_a_sq), math.sqrt(norm_b_sq)
    cosine = 1.0
    if norm_a > _ZERO_NORM and norm_b > _ZERO_NORM:
        cosine = max(-1.0, min(1.0, dot / (norm_a * norm_b)))
    if abs(cosine) > COLINEAR_COSINE:
        return 1.0 - t, t
    omega = math.acos(cosine)
    sin_omega = math.sin(omega)
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega
