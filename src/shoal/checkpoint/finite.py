"""Whether values hold a NaN or Inf: for tensors, and for numpy arrays of stored bits (no torch)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# the exponent bits: all ones is Inf or NaN
_EXPONENT = {"bfloat16": np.uint16(0x7F80), "float16": np.uint16(0x7C00)}


def all_finite(values: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or Inf (always true for integers).

    A sum is finite only if every term is, so a finite sum (one fast reduction) settles it;
    only a non-finite sum, which may also be an overflow of large finite values, is checked
    entry by entry.
    """
    import torch

    if not values.is_floating_point() or values.numel() == 0:
        return True
    total = float(values.sum(dtype=torch.float64 if values.dtype == torch.float64 else torch.float32))
    return math.isfinite(total) or bool(torch.isfinite(values).all())


def array_all_finite(values: np.ndarray, dtype: str) -> bool:
    """:func:`all_finite` of the tensor of ``dtype`` whose stored bits are ``values`` (as the reader's arrays)."""
    if dtype in _EXPONENT:
        exponent = _EXPONENT[dtype]
        return not bool(((values.view(np.uint16) & exponent) == exponent).any())
    if dtype in ("float32", "float64"):
        with np.errstate(over="ignore", invalid="ignore"):
            total = float(values.sum(dtype=np.float64 if dtype == "float64" else np.float32))
        return math.isfinite(total) or bool(np.isfinite(values).all())
    if dtype.startswith("float"):  # the float8s: the array holds bytes
        raise ValueError(f"no finiteness check on the stored bits of {dtype}")
    return True
