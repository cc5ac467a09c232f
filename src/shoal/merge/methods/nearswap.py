"""NearSwap: move the base toward the other model where the two are already close."""

from __future__ import annotations

from typing import Sequence

from shoal.checkpoint.lazy_torch import torch
from shoal.errors import RecipeError
from shoal.merge.methods._inputs import check_tensors, working_dtype
from shoal.merge.registry import ParamSpec, merge_method

MIN_DISTANCE = 1e-6  # |base - other| below this counts as this distance (no division by zero)

PAPER = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
T = ParamSpec("t", "float", False, None, 0.0, 0.01,
              "nearswap: distance below which an entry takes the other model's value")


@merge_method("nearswap", needs_base=True, paper=PAPER, min_models=1, max_models=1,
              chunked="shoal.merge.chunks:elementwise", own_params=(T,))
def nearswap(base: torch.Tensor, models: Sequence[torch.Tensor], *, t: float | None = None) -> torch.Tensor:
    """NearSwap: interpolate each entry toward the other model by ``t / |base - other|``, at most fully.

    alchemonaut, QuartetAnemoi-70B-t0.0001 model card, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001
    (and mergekit's docs/merge_methods.md, "Nearswap")
    w = clamp(t / max(|base - other|, 1e-6), 0, 1);  result = w * other + (1 - w) * base
    Entries closer than ``t`` are swapped for the other model's; far ones barely move. ``t`` has
    no default (as in mergekit): the recipe must set it.
    """
    out_dtype = check_tensors("nearswap", base, models, needs_base=True, min_models=1, max_models=1)
    if t is None:
        raise RecipeError("merge method 'nearswap' needs parameter 't' (the distance threshold, e.g. 0.0001)")
    if t < 0:
        raise RecipeError(f"merge method 'nearswap': t must be >= 0, got {t}")
    dtype = working_dtype(out_dtype)
    a = base.to(dtype)
    b = models[0].to(dtype)
    weight = (t / (a - b).abs().clamp(min=MIN_DISTANCE)).clamp(0.0, 1.0)
    return (weight * b + (1.0 - weight) * a).to(out_dtype)
