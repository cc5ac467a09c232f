"""The built-in merge methods; importing this package registers them.

Each method is a pure function in its own module. TIES, DARE, DELLA and Breadcrumbs are
:func:`~shoal.merge.methods.generalized.generalized_task_arithmetic` with different
sparsifiers (:mod:`.sparsify`) and consensus settings (:mod:`.consensus`).
"""

from __future__ import annotations

from shoal.merge.methods import (  # noqa: F401  (importing registers the methods)
    arcee_fusion,
    breadcrumbs,
    dare,
    della,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
from shoal.merge.methods.consensus import disjoint_merge, elect_sign, task_vector, weighted_sum
from shoal.merge.methods.generalized import generalized_task_arithmetic
from shoal.merge.methods.selection import top_k_mask
from shoal.merge.methods.sparsify import drop_by_magnitude_rank, drop_random, trim_by_magnitude, trim_outliers

__all__ = [
    "disjoint_merge", "drop_by_magnitude_rank", "drop_random", "elect_sign", "generalized_task_arithmetic",
    "task_vector", "top_k_mask", "trim_by_magnitude", "trim_outliers", "weighted_sum",
]
