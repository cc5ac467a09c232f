"""The fast CPU executor: every tensor in fixed-size chunks, on a pool of threads, straight to disk.

A chunk is a flat range of entries of one output tensor (64K entries: the temporaries of a
chunk stay in a core's cache). A worker reads that range of each source with ``pread`` (no
memory map, no whole-tensor copy), computes it with the method's own elementwise code, and
``pwrite``s the result into its place in a pre-laid-out shard file. Workers run side by side (torch's own intra-op threads are set to 1 meanwhile, so
one busy core never stalls the others at a barrier), which overlaps reading, computing and
writing; memory is a few chunks per worker, whatever the model or tensor size.

Methods that look at a whole tensor first take an extra pass over the chunks:

- TIES: the k-th largest magnitude of each task vector (:class:`~.selection.KthLargest`),
  then the entries equal to it are taken in flat order, as :func:`~.selection.top_k_mask` does;
- DARE: the random draws of every model but the last are made first, in the exact order of
  the one-tensor code (model by model, entry by entry), and kept as masks;
- SLERP: the dot product and norms, summed over the same fixed blocks as :func:`~.slerp.slerp`.

With numba installed (the ``fast`` extra), TIES and DARE-TIES chunks run through the fused
loops of :mod:`~shoal.merge.kernels` instead of the methods' torch code: every step for one
entry at a time, the same float32 arithmetic in the same order.

Every result is bitwise identical to :func:`~shoal.merge.execute.compute_op` on the whole
tensor (``tests/merge/test_merge_fast_path.py``, ``tests/merge/test_merge_kernels.py``).
Other methods and configurations run whole-tensor (:func:`~shoal.merge.execute.compute_op`).
"""

from __future__ import annotations

import functools
import gc
import inspect
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from shoal.checkpoint import CheckpointReader
from shoal.checkpoint.reader import all_finite
from shoal.errors import MergeError
from shoal.merge.methods._inputs import per_model, uniform_like, working_dtype
from shoal.merge.methods.consensus import task_vector
from shoal.merge.methods.generalized import generalized_task_arithmetic
from shoal.merge.methods.selection import (SAMPLE_SIZE, KthLargest, Scan, sample_positions, take_first_ties,
                                          ties_per_piece)
from shoal.merge.methods.slerp import STATS_BLOCK, block_stats, slerp_coefficients, sum_block_stats
from shoal.merge.methods.sparsify import apply_keep_mask, trim_count
from shoal.merge.plan import COPY, SourceRef, TensorOp
from shoal.merge.pool import open_pools, ranges_of, run_all, run_in_order
from shoal.merge.registry import get_method

CHUNK = 1 << 16  # entries per chunk (a multiple of STATS_BLOCK); small enough for a core's cache
FUSED_CHUNKS = 4  # the fused loops take this many chunks at a time (a TIES merge: 20% less CPU than one)
ELEMENTWISE = {COPY, "linear", "task_arithmetic", "passthrough"}
_SAMPLE_RUN = 1024  # the TIES sample is read as runs of this many neighbouring entries
_SAMPLE_ABOVE = 1 << 18  # smaller tensors are scanned without a bracket (the window is all of it)

USE_KERNELS = True  # TIES and DARE-TIES through the fused numba loops when numba is installed


def fused_kernels() -> ModuleType | None:
    """:mod:`shoal.merge.kernels` when the fused loops can run (``USE_KERNELS``, numba installed), else None."""
    return _load_kernels() if USE_KERNELS else None


@functools.lru_cache(maxsize=1)
def _load_kernels() -> ModuleType | None:
    try:
        from shoal.merge import kernels
    except ImportError:  # numba is the optional ``fast`` extra
        return None
    if open_pools():  # numba's objects, like torch's, are set aside from collections while the pool runs
        gc.freeze()
    # the loops repeat torch's rounding; where torch's own add-with-alpha is not consistent, they cannot
    return kernels if kernels.torch_fuses_alpha() is not None else None


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _params(op: TensorOp) -> dict[str, Any]:
    """The op's keyword arguments with the method's defaults filled in."""
    fn = get_method(op.method).fn
    defaults = {name: p.default for name, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **op.kwargs()}


def streamable(op: TensorOp, readers: Mapping[str, CheckpointReader], *, compat: str = "paper") -> bool:
    """Whether :func:`run_streamed` computes ``op`` (else run it whole with ``compute_op``)."""
    if not all(readers[ref.model].can_read_range(ref.tensor) for ref in op.sources):
        return False
    if not all(readers[ref.model].dtype(ref.tensor).is_floating_point for ref in op.sources):
        return False
    if op.method in ELEMENTWISE or op.method in ("ties", "slerp"):
        return True
    if op.method in ("dare_ties", "dare_linear"):  # mergekit's L1 rescaling needs whole-tensor sums
        return compat != "mergekit" or not _params(op).get("rescale", True)
    return False


_buffers = threading.local()  # each worker thread's read buffers: {slot: uint8 tensor}


def buffer(slot: int, nbytes: int) -> torch.Tensor:
    """This thread's buffer ``slot``, at least ``nbytes`` long (kept from chunk to chunk: no page faults)."""
    kept = getattr(_buffers, "slots", None)
    if kept is None:
        kept = _buffers.slots = {}
    found = kept.get(slot)
    if found is None or found.numel() < nbytes:
        found = kept[slot] = torch.empty(nbytes, dtype=torch.uint8)
    return found


class _Sources:
    """Reads flat ranges of an op's sources, checked for NaN/Inf like ``CheckpointReader.get``.

    ``reuse``: the base and the models are read into the calling thread's buffers (slot 0 for
    the base, k + 1 for model k), so a range read stays valid only until the thread reads the
    next one; for the fused loops, which are done with a chunk before they read the next.
    """

    def __init__(self, op: TensorOp, readers: Mapping[str, CheckpointReader], *, reuse: bool = False) -> None:
        self.op = op
        self.readers = readers
        self.reuse = reuse

    def read(self, ref: SourceRef, start: int, stop: int, *, check: bool = True,
             slot: int | None = None) -> torch.Tensor:
        reader = self.readers[ref.model]
        out = None
        if self.reuse and slot is not None:
            out = buffer(slot, (stop - start) * reader.dtype(ref.tensor).itemsize)
        values = reader.read_range(ref.tensor, start, stop, out=out)
        if check:
            reader.check_range(ref.tensor, values)
        return values

    def base(self, start: int, stop: int, *, check: bool = True) -> torch.Tensor | None:
        return self.read(self.op.base, start, stop, check=check, slot=0) if self.op.base is not None else None

    def models(self, start: int, stop: int, *, check: bool = True) -> list[torch.Tensor]:
        return [self.read(ref, start, stop, check=check, slot=k + 1) for k, ref in enumerate(self.op.models)]


def _finish(op: TensorOp, result: torch.Tensor) -> torch.Tensor:
    """What ``compute_op`` does with a method's result: the NaN/Inf check, then the output dtype."""
    if op.method != COPY and not all_finite(result):
        raise MergeError(f"merged tensor {op.name!r} contains NaN or Inf ({op.method})")
    return result.to(op.out_dtype)


Write = Callable[[int, torch.Tensor], None]


def run_streamed(op: TensorOp, readers: Mapping[str, CheckpointReader], write: Write,
                 pool: ThreadPoolExecutor, *, compat: str = "paper", chunk: int | None = None) -> bool:
    """Compute ``op`` chunk by chunk, calling ``write(start, values)`` for each piece of the result.

    Returns False (having written nothing) when the op must run whole after all (a TIES
    threshold that the sample failed to bracket).
    """
    chunk = chunk or CHUNK
    if chunk <= 0 or chunk % STATS_BLOCK:
        raise ValueError(f"chunk must be a positive multiple of {STATS_BLOCK}, got {chunk}")
    sources = _Sources(op, readers)
    if op.method in ("ties", "dare_ties") and _kernels_for(op, sources) is not None:
        chunk *= FUSED_CHUNKS  # one pass per chunk: cache matters less than the per-chunk Python
        sources.reuse = True  # the fused loops are done with a chunk before their thread reads the next
    ranges = ranges_of(_numel(op.shape), chunk)
    if op.method in ELEMENTWISE:
        _elementwise(op, sources, write, pool, ranges)
    elif op.method == "slerp":
        _slerp(op, sources, write, pool, ranges)
    elif op.method == "ties":
        return _ties(op, sources, write, pool, ranges, compat=compat)
    elif op.method in ("dare_ties", "dare_linear"):
        _dare(op, sources, write, pool, ranges, compat=compat)
    else:
        raise ValueError(f"method {op.method!r} is not streamed")
    return True


def _elementwise(op: TensorOp, sources: _Sources, write: Write, pool: ThreadPoolExecutor,
                 ranges: list[tuple[int, int]]) -> None:
    method = None if op.method == COPY else get_method(op.method)
    kwargs = op.kwargs()

    def job(start: int, stop: int) -> None:
        if method is None:
            result = sources.read(op.models[0], start, stop)
        else:
            result = method.fn(sources.base(start, stop), sources.models(start, stop), **kwargs)
        write(start, _finish(op, result))

    run_all(pool, job, ranges)


def _slerp(op: TensorOp, sources: _Sources, write: Write, pool: ThreadPoolExecutor,
           ranges: list[tuple[int, int]]) -> None:
    base_ref, model_ref = op.base, op.models[0]
    assert base_ref is not None
    base_dtype = sources.readers[base_ref.model].dtype(base_ref.tensor)
    dtype = working_dtype(base_dtype)
    t = float(_params(op)["t"])

    def pair(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return sources.read(base_ref, start, stop).to(dtype), sources.read(model_ref, start, stop).to(dtype)

    stats = [s for part in run_all(pool, lambda s, e: block_stats(*pair(s, e)), ranges) for s in part]
    coef_a, coef_b = slerp_coefficients(sum_block_stats(stats), t)

    def job(start: int, stop: int) -> None:
        a, b = pair(start, stop)
        write(start, _finish(op, (coef_a * a + coef_b * b).to(base_dtype)))

    run_all(pool, job, ranges)


def _task_vectors(sources: _Sources, start: int, stop: int, *, check: bool) -> list[torch.Tensor]:
    """The task vectors ``m_k - base`` of one range, computed as the methods compute them."""
    base = sources.base(start, stop, check=check)
    assert base is not None
    work_base = base.to(working_dtype(base.dtype))
    return [task_vector(model, work_base) for model in sources.models(start, stop, check=check)]


def _ties(op: TensorOp, sources: _Sources, write: Write, pool: ThreadPoolExecutor,
          ranges: list[tuple[int, int]], *, compat: str) -> bool:
    params = _params(op)
    count = len(op.models)
    weights = per_model("ties", "weight", params["weight"], count)
    densities = per_model("ties", "density", params["density"], count, low=0.0, high=1.0)
    n = _numel(op.shape)
    keep_counts = {k: trim_count(densities[k], n, compat=compat) for k in range(count) if densities[k] < 1.0}
    searched = [k for k, kept in keep_counts.items() if 0 < kept < n]
    thresholds: dict[int, torch.Tensor] = {}
    ties_taken: dict[int, list[int]] = {}
    kernels = _kernels_for(op, sources)
    if searched:
        sample = _sample_magnitudes(sources, n) if n >= _SAMPLE_ABOVE else [None] * count
        searches = {k: KthLargest(keep_counts[k], n, sample[k]) for k in searched}

        def scan(start: int, stop: int) -> dict[int, Scan]:
            if kernels is not None:
                return _fused_ties_scan(kernels, sources, searches, start, stop)
            deltas = _task_vectors(sources, start, stop, check=True)  # the one NaN/Inf check of the sources
            return {k: searches[k].scan(deltas[k].abs()) for k in searched}

        scans = run_all(pool, scan, ranges)
        for k in searched:
            per_range = [found[k] for found in scans]
            threshold = searches[k].value(per_range)
            if threshold is None:
                return False
            thresholds[k] = threshold
            ties_taken[k] = ties_per_piece(per_range, threshold, keep_counts[k])
            if kernels is not None:  # -1: all the ties of the range (the fused loop need not find the last)
                ties_taken[k] = [-1 if taken == int(counts[distinct == threshold].sum()) else taken
                                 for taken, (_, distinct, counts) in zip(ties_taken[k], per_range)]
        del scans
    index_of = {start: i for i, (start, _) in enumerate(ranges)}
    if kernels is not None:
        threshold_values = np.array([float(thresholds[k]) if k in thresholds
                                     else kernels.KEEP_ALL if k not in keep_counts or keep_counts[k] >= n
                                     else kernels.DROP_ALL for k in range(count)], dtype=np.float32)
        combine = kernels.combine_settings(weights, compat=compat, normalize=params["normalize"],
                                           lambda_=params["lambda_"])

        def fused_job(start: int, stop: int) -> None:
            index = index_of[start]
            ties_left = np.array([ties_taken[k][index] if k in thresholds else 0 for k in range(count)],
                                 dtype=np.int64)
            _fused_merge(kernels, op, sources, write, start, stop, kernels.ties_merge,
                         threshold_values, ties_left, *combine)

        run_all(pool, fused_job, ranges)
        return True

    def job(start: int, stop: int) -> None:
        index = index_of[start]

        def sparsify(delta: torch.Tensor, k: int) -> torch.Tensor:
            if k not in keep_counts:
                return delta
            if k not in thresholds:  # keep all or none
                return apply_keep_mask(delta, torch.full(delta.shape, keep_counts[k] >= n, dtype=torch.bool))
            magnitude = delta.abs()
            keep = magnitude > thresholds[k]
            take_first_ties(keep, magnitude, thresholds[k], ties_taken[k][index])
            return apply_keep_mask(delta, keep)

        checked = bool(searched)
        result = generalized_task_arithmetic(
            sources.base(start, stop, check=not checked), sources.models(start, stop, check=not checked),
            method="ties", weights=weights,
            sparsify=sparsify, sign_consensus=True, normalize=params["normalize"],
            lambda_=params["lambda_"], compat=compat)
        write(start, _finish(op, result))

    run_all(pool, job, ranges)
    return True


def _kernels_for(op: TensorOp, sources: _Sources) -> ModuleType | None:
    """The fused loops, when they can run ``op``: they work in float32, the working dtype of all but float64."""
    assert op.base is not None
    if working_dtype(sources.readers[op.base.model].dtype(op.base.tensor)) != torch.float32:
        return None
    return fused_kernels()


def _fused_ties_scan(kernels: ModuleType, sources: _Sources, searches: Mapping[int, KthLargest],
                     start: int, stop: int) -> dict[int, Scan]:
    """``KthLargest.scan`` of each searched model's |task vector| over one range, in one fused loop each."""
    base = sources.base(start, stop, check=False)
    assert base is not None
    found, finite = kernels.scan_chunk(base, sources.models(start, stop, check=False), searches)
    if not finite:
        _check_sources(sources, start, stop)
    return found


def _check_sources(sources: _Sources, start: int, stop: int) -> None:
    """Raise the reader's error for the source of a range that holds a NaN or Inf."""
    sources.base(start, stop, check=True)
    sources.models(start, stop, check=True)
    raise AssertionError(f"a fused loop saw a NaN or Inf in {sources.op.name!r} that the reader did not")


def _fused_merge(kernels: ModuleType, op: TensorOp, sources: _Sources, write: Write, start: int, stop: int,
                 loop: Callable[..., tuple[bool, bool]], *args: Any) -> None:
    """Read a range, merge it with a fused loop, and write it as ``_finish`` would."""
    base = sources.base(start, stop, check=False)
    assert base is not None
    out = buffer(-1, base.numel() * max(base.element_size(), 4))
    result, sources_finite, result_finite = kernels.merge_chunk(
        base, sources.models(start, stop, check=False), loop, *args, out=out)
    if not sources_finite:
        _check_sources(sources, start, stop)
    if not result_finite:
        raise MergeError(f"merged tensor {op.name!r} contains NaN or Inf ({op.method})")
    write(start, result.to(op.out_dtype))


def _sample_magnitudes(sources: _Sources, n: int) -> list[torch.Tensor]:
    """|task vector| of each model at evenly spread runs of entries (to bracket the thresholds), sorted.

    Read here, in one buffer a source: a few hundred small reads, cheaper than jobs for the pool.
    """
    runs = sample_positions(max(1, n // _SAMPLE_RUN), SAMPLE_SIZE // _SAMPLE_RUN).tolist()
    bounds = [(start, min(n, start + _SAMPLE_RUN))
              for start in (min(run * _SAMPLE_RUN, max(0, n - _SAMPLE_RUN)) for run in runs)]

    def gather(ref: SourceRef) -> torch.Tensor:
        reader = sources.readers[ref.model]
        dtype = reader.dtype(ref.tensor)
        values = torch.empty(sum(stop - start for start, stop in bounds), dtype=dtype)
        raw, at = values.view(torch.uint8), 0
        for start, stop in bounds:
            size = (stop - start) * dtype.itemsize
            reader.read_range(ref.tensor, start, stop, out=raw[at:at + size])
            at += size
        return values

    assert sources.op.base is not None
    base = gather(sources.op.base)
    work_base = base.to(working_dtype(base.dtype))
    # handed over sorted: KthLargest sorts its sample with torch (4 ms for 64K values);
    # numpy's vectorized sort takes 0.2 ms, and a sorted input then sorts fast
    return [torch.from_numpy(np.sort(task_vector(gather(ref), work_base).abs().numpy())) for ref in sources.op.models]


def _dare(op: TensorOp, sources: _Sources, write: Write, pool: ThreadPoolExecutor,
          ranges: list[tuple[int, int]], *, compat: str) -> None:
    """DARE with the random draws of the one-tensor code: one generator, model by model, in flat order."""
    params = _params(op)
    count = len(op.models)
    weights = per_model(op.method, "weight", params["weight"], count)
    densities = per_model(op.method, "density", params["density"], count, low=0.0, high=1.0)
    normalize = params["normalize"]
    if normalize is None:
        normalize = compat != "mergekit"
    rescale = params["rescale"]
    generator = torch.Generator().manual_seed(op.seed)
    drawn = [k for k in range(count) if 0.0 < densities[k] < 1.0]

    def draw(k: int, start: int, stop: int) -> torch.Tensor:
        return uniform_like(torch.empty(stop - start), generator) < densities[k]

    # every drawn model but the last is drawn in full first (its masks, one byte an entry) ...
    masks = {k: [draw(k, start, stop) for start, stop in ranges] for k in drawn[:-1]}
    index_of = {start: i for i, (start, _) in enumerate(ranges)}
    kernels = _kernels_for(op, sources) if op.method == "dare_ties" else None
    if kernels is not None:
        divisors = np.array([densities[k] if rescale and 0.0 < densities[k] < 1.0 else 1.0 for k in range(count)],
                            dtype=np.float32)
        combine = kernels.combine_settings(weights, compat=compat, normalize=normalize, lambda_=params["lambda_"])

        def fused_job(start: int, stop: int, last_mask: torch.Tensor | None) -> None:
            index = index_of[start]
            whole = {True: np.ones(stop - start, dtype=np.uint8), False: np.zeros(stop - start, dtype=np.uint8)}
            keep = tuple((masks[k][index] if k in masks else last_mask).view(torch.uint8).numpy()
                         if k in drawn else whole[densities[k] >= 1.0] for k in range(count))
            _fused_merge(kernels, op, sources, write, start, stop, kernels.dare_merge, keep, divisors, *combine)

    def torch_job(start: int, stop: int, last_mask: torch.Tensor | None) -> None:
        index = index_of[start]

        def sparsify(delta: torch.Tensor, k: int) -> torch.Tensor:
            if densities[k] >= 1.0:
                return delta
            if densities[k] <= 0.0:
                return delta.zero_()
            apply_keep_mask(delta, masks[k][index] if k in masks else last_mask)
            return delta.div_(densities[k]) if rescale else delta

        result = generalized_task_arithmetic(
            sources.base(start, stop), sources.models(start, stop), method=op.method, weights=weights,
            sparsify=sparsify, sign_consensus=op.method == "dare_ties", normalize=normalize,
            lambda_=params["lambda_"], compat=compat)
        write(start, _finish(op, result))

    # ... and the last one chunk by chunk, in order, as the workers go
    last = drawn[-1] if drawn else None
    run_in_order(pool, fused_job if kernels is not None else torch_job, ranges,
                  lambda start, stop: draw(last, start, stop) if last is not None else None)
