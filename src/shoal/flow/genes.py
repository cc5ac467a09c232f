"""The gene transform every search space shares: a gene in [0, 1] onto a parameter's range.

``low + (high - low) (1 - cos(pi x)) / 2`` is smooth and monotone and reaches both ends of the
range with zero slope, so CMA-ES can sit at an end without clamping; its middle is the
middle of the range, where the paper's CMA-ES settings start (x0 = 1/2, sigma = 1/6).
Evolve's parameter space and flow's data-flow genome both decode through it; it lives in flow
because flow sits below evolve in the import graph.
"""

from __future__ import annotations

import math


def to_range(x: float, low: float, high: float) -> float:
    """A gene in [0, 1] (clamped) onto [low, high].

    Written with a sine so that x = 1/2 gives exactly the middle, and rounded to 12 decimals so
    that the gene :func:`from_range` gives for a value decodes to that value exactly where it
    matters (a hop scale of 1 must stay 1 for a path to export to the source architecture)."""
    x = min(max(x, 0.0), 1.0)
    return round(low + (high - low) * (0.5 - 0.5 * math.sin(math.pi * (0.5 - x))), 12)


def from_range(value: float, low: float, high: float) -> float:
    """The inverse of :func:`to_range` (values outside the range are clamped)."""
    u = min(max((value - low) / (high - low), 0.0), 1.0)
    return math.acos(1.0 - 2.0 * u) / math.pi
