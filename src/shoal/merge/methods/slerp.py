"""SLERP: spherical linear interpolation between the base and one other model."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from shoal.merge.methods._inputs import check_tensors, working_dtype
from shoal.merge.registry import merge_method

COLINEAR_COSINE = 0.9995  # above this |cos|, the angle is too small to divide by sin(angle)
_ZERO_NORM = 1e-8


@merge_method("slerp", needs_base=True, paper="https://doi.org/10.1145/325165.325242",
              min_models=1, max_models=1)
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
    norm_a, norm_b = float(a.norm()), float(b.norm())
    cosine = 1.0
    if norm_a > _ZERO_NORM and norm_b > _ZERO_NORM:
        cosine = max(-1.0, min(1.0, float(a @ b) / (norm_a * norm_b)))
    if abs(cosine) > COLINEAR_COSINE:
        coef_a, coef_b = 1.0 - t, t
    else:
        omega = math.acos(cosine)
        sin_omega = math.sin(omega)
        coef_a, coef_b = math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega
    return (coef_a * a + coef_b * b).reshape(base.shape).to(out_dtype)
