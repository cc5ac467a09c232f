"""Checks and conversions shared by the merge methods.

Methods compute in float32 when their inputs are half precision (bf16/fp16) and in the
inputs' own dtype when that is float32 or float64; the result goes back to the dtype of the
base tensor (or of the first model when there is no base).
"""

from __future__ import annotations

from typing import Literal, Sequence, Union

from shoal.checkpoint.lazy_torch import torch
from shoal.errors import MergeError, RecipeError
from shoal.merge.methods.randomness import EntryRandom

Compat = Literal["paper", "mergekit"]
PerModel = Union[float, Sequence[float]]  # one value for every model, or one value per model

Randomness = Union[EntryRandom, "torch.Generator"]  # counter-based (paper) or sequential (mergekit's draws)

COMPAT_CHOICES = ("paper", "mergekit")


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in for inputs of ``dtype``."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def check_tensors(method: str, base: torch.Tensor | None, models: Sequence[torch.Tensor], *,
                  needs_base: bool, min_models: int = 1, max_models: int | None = None) -> torch.dtype:
    """Validate the tensors a method receives; returns the output dtype."""
    if needs_base and base is None:
        raise MergeError(f"merge method {method!r} needs a base tensor")
    count = len(models)
    if count < min_models or (max_models is not None and count > max_models):
        wanted = (f"exactly {min_models}" if max_models == min_models
                  else f"at least {min_models}" if max_models is None
                  else f"{min_models} to {max_models}")
        raise MergeError(f"merge method {method!r} takes {wanted} model tensor(s) besides the base, "
                         f"got {count}")
    reference = base if base is not None else models[0]
    for i, model in enumerate(models):
        if model.shape != reference.shape:
            what = "base" if base is not None else "model 0"
            raise MergeError(f"merge method {method!r}: shape mismatch, {what} has {list(reference.shape)}, "
                             f"model {i} has {list(model.shape)}")
    return reference.dtype


def per_model(method: str, name: str, value: PerModel, count: int, *,
              low: float | None = None, high: float | None = None) -> list[float]:
    """One float per model: a scalar is repeated, a sequence must have ``count`` entries."""
    if isinstance(value, (int, float)):
        values = [float(value)] * count
    else:
        values = [float(v) for v in value]
        if len(values) != count:
            raise RecipeError(f"merge method {method!r}: parameter {name!r} has {len(values)} values "
                              f"for {count} models")
    for v in values:
        if (low is not None and v < low) or (high is not None and v > high):
            raise RecipeError(f"merge method {method!r}: parameter {name!r} must lie in "
                              f"[{low}, {high}], got {v}")
    return values


def check_compat(method: str, compat: str) -> None:
    if compat not in COMPAT_CHOICES:
        raise RecipeError(f"merge method {method!r}: compat must be one of {', '.join(COMPAT_CHOICES)}, "
                          f"got {compat!r}")


def generator_or_default(generator: Randomness | None, compat: str = "paper") -> Randomness:
    """The caller's randomness, or the default for ``compat`` seeded with 0 (never the global RNG)."""
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(0) if compat == "mergekit" else EntryRandom(0)


def keep_mask(delta: torch.Tensor, probability: float | torch.Tensor, generator: Randomness,
              model: int) -> torch.Tensor:
    """Which entries of model ``model``'s task vector ``delta`` a random drop keeps.

    An :class:`EntryRandom` draws by position (the seed contract of
    :mod:`~shoal.merge.methods.randomness`); a ``torch.Generator`` draws ``uniform_like(delta)``
    in flat order, mergekit's way, and keeps the entries below ``probability``.
    """
    if isinstance(generator, EntryRandom):  # a probability tensor may be shaped (rows, last dim): same flat order
        shape = probability.shape if isinstance(probability, torch.Tensor) else delta.shape
        return generator.keep(model, shape, probability, delta.device)
    draws = uniform_like(delta, generator)
    if isinstance(probability, torch.Tensor):
        return draws.reshape(probability.shape) < probability
    return draws < probability


def uniform_like(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform [0, 1) float32 draws, one per entry of ``tensor``, from ``generator``.

    Drawn on the generator's device and moved to the tensor's, so a seed gives the same draws
    whatever device the tensors live on.
    """
    draws = torch.rand(tensor.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return draws.to(tensor.device)
