"""The fast CPU executor: every tensor in fixed-size chunks, on a pool of threads, straight to disk.

A chunk is a flat range of entries of one output tensor (64K entries: the temporaries of a
chunk stay in a core's cache; 512K for the fused loops). A worker takes that range of each
source as a view of the file's pages (``CheckpointReader.map_range``, let go when the chunk
is done; the torch code of TIES and DARE reads it with ``pread`` instead), computes it with
the method's own elementwise code, and ``pwrite``s the result into its place in a
pre-laid-out shard file. Workers run side by side (torch's own intra-op threads are set to 1
meanwhile, so one busy core never stalls the others at a barrier), which overlaps reading,
computing and writing; memory is a few chunks per worker, whatever the model or tensor size.

Methods that look at a whole tensor first take an extra pass over the chunks:

- TIES: the k-th largest magnitude of each task vector (:class:`~.selection.KthLargest`),
  then the entries equal to it are taken in flat order, as :func:`~.selection.top_k_mask` does;
- DARE: the random draws of every model but the last are made first, in the exact order of
  the one-tensor code (model by model, entry by entry), and kept as masks;
- SLERP: the dot product and norms, summed over the same fixed blocks as :func:`~.slerp.slerp`.

With numba installed (the ``fast`` extra), TIES and DARE-TIES chunks run through the fused
loops of :mod:`~shoal.merge.kernels` (called through :mod:`~shoal.merge.fused`) instead of the methods' torch code: every step for one
entry at a time, the same float32 arithmetic in the same order.

Each pass is a :class:`~.pool.Stage` (:func:`start_streamed`): the next op's passes are
queued while this one's run, so the workers do not wait at the end of a pass or for the serial
steps between passes (the TIES sample and thresholds). TIES is in :mod:`~.streamed_ties`.

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
from concurrent.futures import Future, ThreadPoolExecutor
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from shoal.checkpoint import CheckpointReader
from shoal.checkpoint.reader import all_finite
from shoal.errors import MergeError
from shoal.merge.methods._inputs import per_model, uniform_like, working_dtype
from shoal.merge.methods.generalized import generalized_task_arithmetic
from shoal.merge.methods.slerp import STATS_BLOCK, block_stats, slerp_coefficients, sum_block_stats
from shoal.merge.methods.sparsify import apply_keep_mask
from shoal.merge.plan import COPY, SourceRef, TensorOp
from shoal.merge.pool import Stage, open_pools, ranges_of, run_in_order, start_stages
from shoal.merge.registry import get_method

CHUNK = 1 << 16  # entries per chunk (a multiple of STATS_BLOCK); small enough for a core's cache
FUSED_CHUNKS = 8  # the fused loops take this many chunks at a time (per-chunk Python is the cost here)
ELEMENTWISE = {COPY, "linear", "task_arithmetic", "passthrough"}

USE_KERNELS = True  # TIES and DARE-TIES through the fused numba loops when numba is installed


def fused_kernels() -> ModuleType | None:
    """:mod:`shoal.merge.fused` when the fused loops can run (``USE_KERNELS``, numba installed), else None."""
    return _load_kernels() if USE_KERNELS else None


@functools.lru_cache(maxsize=1)
def _load_kernels() -> ModuleType | None:
    collecting = gc.isenabled()
    gc.disable()  # importing numba makes ~10^5 lasting objects: collections meanwhile would only slow it
    try:
        try:
            from shoal.merge import fused as kernels
        except ImportError:  # numba is the optional ``fast`` extra
            return None
        # numba sets itself up on the first call of a compiled function (0.3 s): here, not in a worker
        kernels.to_bf16_bits(np.zeros(1, np.float32), np.zeros(1, np.uint16))
    finally:
        if collecting:
            gc.enable()
    if open_pools():  # numba's objects, like torch's, are set aside from collections while the pool runs
        gc.freeze()
    # the loops repeat torch's rounding; where torch's own add-with-alpha is not consistent, they cannot
    return kernels if kernels.torch_fuses_alpha() is not None else None


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def op_params(op: TensorOp) -> dict[str, Any]:
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
        return compat != "mergekit" or not op_params(op).get("rescale", True)
    return False


_buffers = threading.local()  # each worker thread's result buffer


def buffer(nbytes: int) -> torch.Tensor:
    """This thread's result buffer, at least ``nbytes`` long (kept from chunk to chunk: no page faults)."""
    found = getattr(_buffers, "out", None)
    if found is None or found.numel() < nbytes:
        found = _buffers.out = torch.empty(nbytes, dtype=torch.uint8)
    return found


class Sources:
    """Reads flat ranges of an op's sources, checked for NaN/Inf like ``CheckpointReader.get``.

    ``mapped``: ranges are views of the files' pages (``CheckpointReader.map_range``), not
    copies, valid until the job that read them ends: jobs made with :meth:`job` let them go
    then, so resident memory stays a few chunks. For jobs done with their ranges when they
    return (the fused loops, elementwise methods, SLERP); reading two sources into memory of
    their own cost more than a TIES chunk's arithmetic.
    """

    def __init__(self, op: TensorOp, readers: Mapping[str, CheckpointReader], *, mapped: bool = False) -> None:
        self.op = op
        self.readers = readers
        self.mapped = mapped

    def read(self, ref: SourceRef, start: int, stop: int, *, check: bool = True) -> torch.Tensor:
        reader = self.readers[ref.model]
        if self.mapped:
            values = reader.map_range(ref.tensor, start, stop)
        else:
            values = reader.read_range(ref.tensor, start, stop)
        if check:
            reader.check_range(ref.tensor, values)
        return values

    def base(self, start: int, stop: int, *, check: bool = True) -> torch.Tensor | None:
        return self.read(self.op.base, start, stop, check=check) if self.op.base is not None else None

    def models(self, start: int, stop: int, *, check: bool = True) -> list[torch.Tensor]:
        return [self.read(ref, start, stop, check=check) for ref in self.op.models]

    def job(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn(start, stop, ...)``, then (mapped) the pages of its range let go."""
        if not self.mapped:
            return fn

        def run(start: int, stop: int, *args: Any) -> Any:
            try:
                return fn(start, stop, *args)
            finally:
                for ref in self.op.sources:
                    self.readers[ref.model].release_range(ref.tensor, start, stop)

        return run


def finish(op: TensorOp, result: torch.Tensor) -> torch.Tensor:
    """What ``compute_op`` does with a method's result: the NaN/Inf check, then the output dtype."""
    if op.method != COPY and not all_finite(result):
        raise MergeError(f"merged tensor {op.name!r} contains NaN or Inf ({op.method})")
    return result.to(op.out_dtype)


Write = Callable[[int, torch.Tensor], None]


def start_streamed(op: TensorOp, readers: Mapping[str, CheckpointReader], write: Write,
                   pool: ThreadPoolExecutor, *, compat: str = "paper", chunk: int | None = None) -> Future:
    """Start computing ``op`` chunk by chunk on ``pool``, calling ``write(start, values)`` for each piece.

    Returns at once (after the serial first steps, such as the TIES sample), with a future of
    True when every piece is written, or of False, having written nothing, when the op must
    run whole after all (a TIES threshold that the sample failed to bracket).
    """
    chunk = chunk or CHUNK
    if chunk <= 0 or chunk % STATS_BLOCK:
        raise ValueError(f"chunk must be a positive multiple of {STATS_BLOCK}, got {chunk}")
    sources = Sources(op, readers, mapped=op.method in ELEMENTWISE or op.method == "slerp")
    if op.method in ("ties", "dare_ties") and kernels_for(op, sources) is not None:
        chunk *= FUSED_CHUNKS  # one pass per chunk: cache matters less than the per-chunk Python
        sources.mapped = True  # the fused loops are done with a chunk when they return
    ranges = ranges_of(numel(op.shape), chunk)
    if op.method in ELEMENTWISE:
        return start_stages(pool, _elementwise(op, sources, write, ranges))
    if op.method == "slerp":
        return start_stages(pool, _slerp(op, sources, write, ranges))
    if op.method == "ties":
        from shoal.merge.streamed_ties import ties_stages

        return start_stages(pool, ties_stages(op, sources, write, ranges, compat=compat))
    if op.method in ("dare_ties", "dare_linear"):
        _dare(op, sources, write, pool, ranges, compat=compat)  # in order: the random draws are sequential
        done: Future = Future()
        done.set_result(True)
        return done
    raise ValueError(f"method {op.method!r} is not streamed")


def run_streamed(op: TensorOp, readers: Mapping[str, CheckpointReader], write: Write,
                 pool: ThreadPoolExecutor, *, compat: str = "paper", chunk: int | None = None) -> bool:
    """:func:`start_streamed`, and wait for it: whether ``op`` was written (False: run it whole)."""
    return bool(start_streamed(op, readers, write, pool, compat=compat, chunk=chunk).result())


def all_written(results: list[Any]) -> bool:
    """The value of a last stage whose jobs write their pieces: the op is written."""
    return True


def _elementwise(op: TensorOp, sources: Sources, write: Write, ranges: list[tuple[int, int]]) -> Stage:
    method = None if op.method == COPY else get_method(op.method)
    kwargs = op.kwargs()

    def job(start: int, stop: int) -> None:
        if method is None:
            result = sources.read(op.models[0], start, stop)
        else:
            result = method.fn(sources.base(start, stop), sources.models(start, stop), **kwargs)
        write(start, finish(op, result))

    return Stage(sources.job(job), ranges, all_written)


def _slerp(op: TensorOp, sources: Sources, write: Write, ranges: list[tuple[int, int]]) -> Stage:
    base_ref, model_ref = op.base, op.models[0]
    assert base_ref is not None
    base_dtype = sources.readers[base_ref.model].dtype(base_ref.tensor)
    dtype = working_dtype(base_dtype)
    t = float(op_params(op)["t"])

    def pair(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return sources.read(base_ref, start, stop).to(dtype), sources.read(model_ref, start, stop).to(dtype)

    def merge_stage(per_range: list[list[Any]]) -> Stage:
        coef_a, coef_b = slerp_coefficients(sum_block_stats([s for part in per_range for s in part]), t)

        def job(start: int, stop: int) -> None:
            a, b = pair(start, stop)
            write(start, finish(op, (coef_a * a + coef_b * b).to(base_dtype)))

        return Stage(sources.job(job), ranges, all_written)

    return Stage(sources.job(lambda start, stop: block_stats(*pair(start, stop))), ranges, merge_stage)


def kernels_for(op: TensorOp, sources: Sources) -> ModuleType | None:
    """The fused loops, when they can run ``op``: they work in float32, the working dtype of all but float64."""
    assert op.base is not None
    if working_dtype(sources.readers[op.base.model].dtype(op.base.tensor)) != torch.float32:
        return None
    return fused_kernels()


def check_sources(sources: Sources, start: int, stop: int) -> None:
    """Raise the reader's error for the source of a range that holds a NaN or Inf."""
    sources.base(start, stop, check=True)
    sources.models(start, stop, check=True)
    raise AssertionError(f"a fused loop saw a NaN or Inf in {sources.op.name!r} that the reader did not")


def fused_merge(kernels: ModuleType, op: TensorOp, sources: Sources, write: Write, start: int, stop: int,
                loop: Callable[..., tuple[bool, bool]], *args: Any) -> None:
    """Read a range, merge it with a fused loop, and write it as :func:`finish` would."""
    base = sources.base(start, stop, check=False)
    assert base is not None
    out = buffer(base.numel() * max(base.element_size(), 4))
    result, sources_finite, result_finite = kernels.merge_chunk(
        base, sources.models(start, stop, check=False), loop, *args, out=out)
    if not sources_finite:
        check_sources(sources, start, stop)
    if not result_finite:
        raise MergeError(f"merged tensor {op.name!r} contains NaN or Inf ({op.method})")
    write(start, result.to(op.out_dtype))


def _dare(op: TensorOp, sources: Sources, write: Write, pool: ThreadPoolExecutor,
          ranges: list[tuple[int, int]], *, compat: str) -> None:
    """DARE with the random draws of the one-tensor code: one generator, model by model, in flat order."""
    params = op_params(op)
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
    kernels = kernels_for(op, sources) if op.method == "dare_ties" else None
    if kernels is not None:
        divisors = np.array([densities[k] if rescale and 0.0 < densities[k] < 1.0 else 1.0 for k in range(count)],
                            dtype=np.float32)
        combine = kernels.combine_settings(weights, compat=compat, normalize=normalize, lambda_=params["lambda_"])

        def fused_job(start: int, stop: int, last_mask: torch.Tensor | None) -> None:
            index = index_of[start]
            whole = {True: np.ones(stop - start, dtype=np.uint8), False: np.zeros(stop - start, dtype=np.uint8)}
            keep = tuple((masks[k][index] if k in masks else last_mask).view(torch.uint8).numpy()
                         if k in drawn else whole[densities[k] >= 1.0] for k in range(count))
            fused_merge(kernels, op, sources, write, start, stop, kernels.dare_merge, keep, divisors, *combine)

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
        write(start, finish(op, result))

    # ... and the last one chunk by chunk, in order, as the workers go
    last = drawn[-1] if drawn else None
    run_in_order(pool, sources.job(fused_job if kernels is not None else torch_job), ranges,
                  lambda start, stop: draw(last, start, stop) if last is not None else None)
