"""Passthrough: one model's tensor, optionally scaled (layer stacking uses this per slice)."""

from __future__ import annotations

from typing import Sequence

from shoal.checkpoint.lazy_torch import torch
from shoal.merge.methods._inputs import PerModel, check_tensors, per_model, working_dtype
from shoal.merge.registry import merge_method


@merge_method("passthrough", needs_base=False, paper="https://github.com/arcee-ai/mergekit",
              min_models=1, max_models=1,
              chunked="shoal.merge.fast.passthrough:passthrough_stages")
def passthrough(base: torch.Tensor | None, models: Sequence[torch.Tensor], *,
                scale: PerModel = 1.0) -> torch.Tensor:
    """Passthrough: the one model's tensor unchanged, or multiplied by ``scale``; ``base`` is not used.

    Layer stacking ("frankenmerges") as popularised by mergekit, https://github.com/arcee-ai/mergekit
    result = scale * m_1   (with scale = 1 the input tensor itself is returned; like mergekit, ``scale`` is a
    per-model parameter, so recipes may set it on the model or slice source)
    """
    out_dtype = check_tensors("passthrough", None, models, needs_base=False, min_models=1, max_models=1)
    (factor,) = per_model("passthrough", "scale", scale, 1)
    if factor == 1.0:
        return models[0]
    return (models[0].to(working_dtype(out_dtype)) * factor).to(out_dtype)
