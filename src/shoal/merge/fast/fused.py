"""The fused loops (:mod:`.ties_loops`, :mod:`.dare_loops`) on torch chunks: their arguments, buffers, results.

What the chunked stages call (:func:`shoal.merge.fast.load_kernels` returns this module, with
the loops themselves and their constants).
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Sequence

import numpy as np
import torch

from shoal.merge.fast.dare_loops import dare_merge, philox_keep
from shoal.merge.fast.primitives import to_bf16_bits
from shoal.merge.fast.ties_loops import DROP_ALL, KEEP_ALL, ties_merge, ties_scan

__all__ = ["DROP_ALL", "KEEP_ALL", "as_input", "combine_settings", "dare_merge", "keep_masks", "merge_chunk",
           "model_inputs", "philox_keep", "scratch", "ties_merge", "ties_scan", "to_bf16_bits", "torch_fuses_alpha"]


@functools.lru_cache(maxsize=None)
def torch_fuses_alpha() -> bool | None:
    """Whether torch computes ``x.add_(y, alpha=w)`` as one fused multiply-add here (None: not consistently).

    Asked on values where the fused and the two-step results differ, over a length that
    covers both torch's vector loop and its scalar tail.
    """
    a = np.float32(1.0 + 2.0**-12)
    c = -np.float32(1.0 + 2.0**-11)
    fused = np.float32(np.float64(a) * np.float64(a) + np.float64(c))  # exact product, one rounding
    unfused = np.float32(np.float32(a * a) + c)
    assert fused != unfused
    got = torch.full((67,), float(c)).add_(torch.full((67,), float(a)), alpha=float(a)).numpy()
    if (got == fused).all():
        return True
    if (got == unfused).all():
        return False
    return None


def as_input(values: torch.Tensor) -> np.ndarray:
    """A chunk as the loops read it: bfloat16 as its bits, anything else widened to float32 as the methods widen it."""
    if values.dtype == torch.bfloat16:
        return values.view(torch.uint16).numpy()
    return values.to(torch.float32).numpy()


def model_inputs(models: Sequence[torch.Tensor]) -> tuple[np.ndarray, ...]:
    """The models' chunks for the loops: a tuple of arrays of one dtype (its length is compiled in)."""
    if all(model.dtype == torch.bfloat16 for model in models):
        return tuple(model.view(torch.uint16).numpy() for model in models)
    return tuple(model.to(torch.float32).numpy() for model in models)


def combine_settings(weights: Sequence[float], *, compat: str, normalize: bool,
                     lambda_: float) -> tuple[Any, ...]:
    """The trailing arguments of the merge loops: how ``generalized_task_arithmetic`` combines task vectors.

    Scalars as torch takes them: float32 (the working dtype).
    """
    fused = torch_fuses_alpha()
    assert fused is not None
    return (np.array(weights, dtype=np.float32), compat == "mergekit", bool(normalize), lambda_ != 1.0,
            np.float32(lambda_), fused)


def merge_chunk(base: torch.Tensor, models: Sequence[torch.Tensor], loop: Callable[..., tuple[bool, bool]],
                *args: Any, out: torch.Tensor | None = None) -> tuple[torch.Tensor, bool, bool]:
    """``loop(base, models, out, *args)`` (:func:`~.ties_loops.ties_merge`, :func:`~.dare_loops.dare_merge`) on torch chunks.

    Returns the result in ``base``'s dtype (what the methods return), whether the sources were
    finite and whether the result is. The loop writes into new memory, or into ``out`` (a
    contiguous ``uint8`` tensor of at least 4 bytes an entry, which the result may then share).
    """
    dtype = base.dtype if base.dtype in (torch.bfloat16, torch.float32) else torch.float32
    # float16: rounded from float32 below, as torch rounds
    if out is None:
        values = torch.empty(base.numel(), dtype=dtype)
    else:
        values = out.reshape(-1)[:base.numel() * dtype.itemsize].view(dtype)
    out_values = (values.view(torch.uint16) if dtype == torch.bfloat16 else values).numpy()
    sources_finite, result_finite = loop(as_input(base), model_inputs(models), out_values, *args)
    result = values.to(base.dtype)
    if result is not values and result_finite:
        result_finite = bool(torch.isfinite(result).all())
    return result, sources_finite, result_finite


_scratch = threading.local()


def scratch(n: int) -> np.ndarray:
    """This thread's (2, >= n) float32 work array for :func:`~.ties_loops.ties_scan`."""
    array = getattr(_scratch, "array", None)
    if array is None or array.shape[1] < n:
        array = _scratch.array = np.empty((2, n), np.float32)
    return array


def keep_masks(key: int, start: int, n: int, thresholds: Sequence[int | None]) -> tuple[np.ndarray, ...]:
    """Each model's keep mask (bytes, 1 = keep) for entries ``start .. start + n``, in this thread's buffers.

    ``thresholds[k]``: model k keeps the entries whose draw is below it
    (:func:`~shoal.merge.methods.randomness.keep_threshold`); None keeps all of them.
    """
    masks = getattr(_scratch, "masks", None)
    if masks is None or masks.shape[0] < len(thresholds) or masks.shape[1] < n:
        masks = _scratch.masks = np.empty((max(len(thresholds), 1), n), np.uint8)
    out = []
    for k, threshold in enumerate(thresholds):
        mask = masks[k, :n]
        if threshold is None:
            mask.fill(1)
        else:
            philox_keep(key, k, start, threshold, mask)
        out.append(mask)
    return tuple(out)
