"""The fused loops (:mod:`.ties_loops`, :mod:`.dare_loops`) on numpy chunks: their arguments, buffers, results.

The chunks are the reader's arrays of stored bits (``bfloat16`` as ``uint16``), so the fused
path runs without torch; only :func:`as_input` (for tests and callers holding tensors) and
:func:`torch_fuses_alpha`'s first question on a machine use it.

What the chunked stages call (:func:`shoal.merge.fast.load_kernels` returns this module, with
the loops themselves and their constants).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import numpy as np

from shoal.checkpoint.dtypes import as_float32 as widen
from shoal.checkpoint.lazy_torch import torch
from shoal.merge.chunks import LOOP_DTYPES
from shoal.merge.fast.dare_loops import dare_merge, philox_keep
from shoal.merge.fast.primitives import to_bf16_bits
from shoal.merge.fast.rounding import torch_fuses_alpha
from shoal.merge.fast.ties_loops import DROP_ALL, KEEP_ALL, ties_merge, ties_scan

__all__ = ["DROP_ALL", "KEEP_ALL", "LOOP_DTYPES", "as_input", "combine_settings", "convert", "dare_merge", "keep_masks",
           "loop_input", "merge_arrays", "model_arrays", "philox_keep", "scratch", "ties_merge", "ties_scan",
           "to_bf16_bits", "torch_fuses_alpha", "widen"]


def as_input(values: torch.Tensor) -> np.ndarray:
    """A torch chunk as the loops read it: bfloat16 as its bits, anything else widened to float32 as the methods widen it."""
    if values.dtype == torch.bfloat16:
        return values.view(torch.uint16).numpy()
    return values.to(torch.float32).numpy()


def loop_input(values: np.ndarray, dtype: str) -> np.ndarray:
    """:func:`as_input` of the chunk whose stored bits are ``values`` (the reader's arrays)."""
    return values if dtype == "bfloat16" else widen(values, dtype)


def model_arrays(models: Sequence[tuple[np.ndarray, str]]) -> tuple[np.ndarray, ...]:
    """The models' chunks ((bits, dtype) each) for the loops: a tuple of arrays of one dtype (its length is compiled in)."""
    if all(dtype == "bfloat16" for _, dtype in models):
        return tuple(values for values, _ in models)
    return tuple(widen(values, dtype) for values, dtype in models)


def convert(values: np.ndarray, dtype: str, to: str) -> np.ndarray:
    """The stored bits of ``values`` (bits of ``dtype``) converted to ``to``, rounded as torch's ``.to`` rounds.

    Between the loops' dtypes only: float32 -> bfloat16 rounds to nearest even (torch's
    conversion, :func:`to_bf16_bits`), -> float16 too (numpy's, IEEE's); widening is exact.
    """
    if dtype == to:
        return values
    wide = widen(values, dtype)
    if to == "float32":
        return wide
    if to == "float16":
        with np.errstate(over="ignore"):  # to Inf, as torch rounds (the callers check finiteness where torch does)
            return wide.astype(np.float16)
    assert to == "bfloat16", to
    out = np.empty(wide.shape, np.uint16)
    to_bf16_bits(wide, out)
    return out


def combine_settings(weights: Sequence[float], *, compat: str, normalize: bool,
                     lambda_: float) -> tuple[Any, ...]:
    """The trailing arguments of the merge loops: how ``generalized_task_arithmetic`` combines task vectors.

    Scalars as torch takes them: float32 (the working dtype).
    """
    fused = torch_fuses_alpha()
    assert fused is not None
    return (np.array(weights, dtype=np.float32), compat == "mergekit", bool(normalize), lambda_ != 1.0,
            np.float32(lambda_), fused)


def merge_arrays(base: tuple[np.ndarray, str], models: Sequence[tuple[np.ndarray, str]],
                 loop: Callable[..., tuple[bool, bool]], *args: Any, out: np.ndarray) -> tuple[np.ndarray, str, bool, bool]:
    """``loop(base, models, out, *args)`` (:func:`~.ties_loops.ties_merge`, :func:`~.dare_loops.dare_merge`) on chunks.

    ``base`` and each of ``models``: (stored bits, dtype), as :meth:`CheckpointReader.map_array`
    reads them. Returns the result's bits in ``base``'s dtype (what the methods return), that
    dtype, whether the sources were finite and whether the result is. The loop writes into
    ``out`` (a ``uint8`` array of at least 4 bytes an entry, which the result may then share).
    """
    values, dtype = base
    written = dtype if dtype in ("bfloat16", "float32") else "float32"  # float16: rounded from float32 below
    n = values.size
    result = out[:n * (2 if written == "bfloat16" else 4)].view(np.uint16 if written == "bfloat16" else np.float32)
    sources_finite, result_finite = loop(loop_input(values, dtype), model_arrays(models), result, *args)
    if written != dtype:
        result = convert(result, written, dtype)
        if result_finite:
            result_finite = bool(np.isfinite(result).all())
    return result, dtype, sources_finite, result_finite


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
