"""NearSwap: move the base toward the other model where the two are already close.

Not registered yet: the registration is one line in ``shoal/merge/methods/__init__.py`` (import
this module) plus the ``@merge_method`` decorator below; ``t`` is already in ``PARAMETERS``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from shoal.merge.methods._inputs import check_tensors, working_dtype

MIN_DISTANCE = 1e-6  # |base - other| below this counts as this distance (no division by zero)


def nearswap(base: torch.Tensor, models: Sequence[torch.Tensor], *, t: float = 0.5) -> torch.Tensor:
    """NearSwap: interpolate each entry toward the other model by ``t / |base - other|``, at most fully.

    alchemonaut, QuartetAnemoi-70B-t0.0001 model card, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001
    (and mergekit's docs/merge_methods.md, "Nearswap")
    w = clamp(t / max(|base - other|, 1e-6), 0, 1);  result = w * other + (1 - w) * base
    Entries closer than ``t`` are swapped for the other model's; far ones barely move.
    """
    out_dtype = check_tensors("nearswap", base, models, needs_base=True, min_models=1, max_models=1)
    if t < 0:
        from shoal.errors import RecipeError

        raise RecipeError(f"merge method 'nearswap': t must be >= 0, got {t}")
    dtype = working_dtype(out_dtype)
    a = base.to(dtype)
    b = models[0].to(dtype)
    weight = (t / (a - b).abs().clamp(min=MIN_DISTANCE)).clamp(0.0, 1.0)
    return (weight * b + (1.0 - weight) * a).to(out_dtype)
