"""Running one op over flat chunks of its tensor: what a method's chunk planner is given and builds on.

A chunk is a flat range of entries of one output tensor. A worker takes that range of each
source (:class:`Sources`), computes it, and ``write(start, values)`` puts the result in its
place in the output shard. Workers run side by side, so reading, computing and writing
overlap, and memory is a few chunks per worker whatever the tensor size.

A method declares its planner in the registry (``chunked=``). The planner gets a
:class:`ChunkJob` and returns the first :class:`~shoal.merge.pool.Stage` of its passes (the
last stage's value is True once every piece is written, or False, with nothing written, when
the op must run whole after all), or None when these settings must run whole from the start.
:func:`elementwise` is the planner of methods whose function works on any flat range.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Mapping, Optional

import numpy as np

from shoal.checkpoint import CheckpointReader
from shoal.checkpoint.dtypes import as_float32, torch_dtype
from shoal.checkpoint.finite import all_finite, array_all_finite
from shoal.checkpoint.lazy_torch import torch
from shoal.errors import MergeError
from shoal.merge.methods.randomness import EntryRandom
from shoal.merge.plan import SourceRef, TensorOp
from shoal.merge.pool import Stage
from shoal.merge.registry import MethodSpec

Write = Callable[[int, "torch.Tensor | np.ndarray"], None]  # (flat start, values in the output dtype)
Ranges = list[tuple[int, int]]
LOOP_DTYPES = ("bfloat16", "float16", "float32")  # what the fused loops read and write (float32: their working dtype)


class Sources:
    """Reads flat ranges of an op's sources, checked for NaN/Inf as ``CheckpointReader.get`` checks.

    Ranges are views of the files' pages (``CheckpointReader.map_range``, no copy), valid until
    the job that read them ends: jobs wrapped with :meth:`job` let the pages go then, so
    resident memory stays a few chunks. :meth:`read` gives tensors, :meth:`array` the stored
    bits as numpy arrays (the fused loops' inputs, no torch).
    """

    def __init__(self, op: TensorOp, readers: Mapping[str, CheckpointReader]) -> None:
        self.op = op
        self.readers = readers

    def read(self, ref: SourceRef, start: int, stop: int, *, check: bool = True) -> torch.Tensor:
        reader = self.readers[ref.model]
        values = reader.map_range(ref.tensor, start, stop)
        if check:
            reader.check_range(ref.tensor, values)
        if self.op.compute_dtype is not None:  # as compute_op widens them
            values = values.to(torch_dtype(self.op.compute_dtype))
        return values

    def array(self, ref: SourceRef, start: int, stop: int) -> tuple[np.ndarray, str]:
        """The stored bits of a range and their dtype, widened to ``compute_dtype`` as :meth:`read` widens (no check)."""
        values = self.readers[ref.model].map_array(ref.tensor, start, stop)
        dtype = self.readers[ref.model].dtype_name(ref.tensor)
        if self.op.compute_dtype is not None and self.op.compute_dtype != dtype:
            assert self.op.compute_dtype == "float32", self.op.compute_dtype
            return as_float32(values, dtype), "float32"
        return values, dtype

    def base(self, start: int, stop: int, *, check: bool = True) -> torch.Tensor | None:
        return self.read(self.op.base, start, stop, check=check) if self.op.base is not None else None

    def models(self, start: int, stop: int, *, check: bool = True) -> list[torch.Tensor]:
        return [self.read(ref, start, stop, check=check) for ref in self.op.models]

    def dtype(self, ref: SourceRef) -> torch.dtype:
        """The dtype :meth:`read` returns for ``ref``."""
        return torch_dtype(self.dtype_name(ref))

    def dtype_name(self, ref: SourceRef) -> str:
        """:meth:`dtype` by name (:mod:`shoal.checkpoint.dtypes`)."""
        return self.op.compute_dtype or self.readers[ref.model].dtype_name(ref.tensor)

    def check(self, start: int, stop: int) -> None:
        """Raise the reader's error for the source of a range that holds a NaN or Inf."""
        self.base(start, stop, check=True)
        self.models(start, stop, check=True)
        raise AssertionError(f"a fused loop saw a NaN or Inf in {self.op.name!r} that the reader did not")

    def job(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn(start, stop, ...)``, then the pages of its range let go."""
        def run(start: int, stop: int, *args: Any) -> Any:
            try:
                return fn(start, stop, *args)
            finally:
                for ref in self.op.sources:
                    self.readers[ref.model].release_range(ref.tensor, start, stop)

        return run


@dataclass(frozen=True)
class ChunkJob:
    """One op to run in chunks: what a chunk planner needs.

    ``kwargs``: the method's keyword arguments with its defaults filled in (Python names),
    ``compat`` and the randomness among them where the method takes them; ``fused``: whether
    the fused loops may be used (:meth:`float32_kernels` loads them, numba and all, only for
    the ops that ask).
    """

    op: TensorOp
    spec: MethodSpec
    kwargs: Mapping[str, Any]
    sources: Sources
    write: Write
    ranges: Ranges
    fused: bool
    fused_chunk: int  # entries per chunk for the fused loops (per-chunk Python is their cost)

    @property
    def compat(self) -> str:
        return str(self.kwargs.get("compat", "paper"))

    def kwargs_at(self, start: int) -> dict[str, Any]:
        """The keyword arguments for the method's function on the piece beginning at flat ``start``."""
        kwargs = dict(self.kwargs)
        generator = kwargs.get("generator")
        if isinstance(generator, EntryRandom):  # counter-based: a piece draws its own entries
            kwargs["generator"] = generator.at(start)
        return kwargs

    def float32_kernels(self) -> ModuleType | None:
        """The fused loops if they can run this op: they work in float32, the working dtype of half precision
        and float32 sources (float64 works in float64), and write the output dtypes a recipe names."""
        if not self.fused or self.op.base is None:
            return None
        if self.op.out_dtype not in LOOP_DTYPES or any(self.sources.dtype_name(ref) not in LOOP_DTYPES
                                                        for ref in self.op.sources):
            return None
        from shoal.merge.fast import load_kernels

        return load_kernels()

    def with_ranges(self, ranges: Ranges) -> "ChunkJob":
        return ChunkJob(self.op, self.spec, self.kwargs, self.sources, self.write, ranges, self.fused,
                        self.fused_chunk)


ChunkPlanner = Callable[[ChunkJob], Optional[Stage]]


def finish(op: TensorOp, spec: MethodSpec | None, result: torch.Tensor) -> torch.Tensor:
    """What ``compute_op`` does with a method's result: the NaN/Inf check, then the output dtype."""
    if spec is not None and not all_finite(result):
        raise MergeError(f"merged tensor {op.name!r} contains NaN or Inf ({op.method})")
    return result.to(torch_dtype(op.out_dtype))


def all_written(results: list[Any]) -> bool:
    """The value of a last stage whose jobs write their pieces: the op is written."""
    return True


def elementwise(job: ChunkJob) -> Stage:
    """The planner of a method whose function, on a flat range of every input, gives that range of its result."""
    op, sources, fn = job.op, job.sources, job.spec.fn

    def run(start: int, stop: int) -> None:
        result = fn(sources.base(start, stop), sources.models(start, stop), **job.kwargs_at(start))
        job.write(start, finish(op, job.spec, result))

    return Stage(sources.job(run), job.ranges, all_written)


def copy_chunks(op: TensorOp, sources: Sources, write: Write, ranges: Ranges) -> Stage:
    """The chunks of a copied tensor (the reader checks them for NaN/Inf); kept in its dtype, as stored bits."""
    ref = op.models[0]
    stored = sources.readers[ref.model].dtype_name(ref.tensor)

    def run(start: int, stop: int) -> None:
        if stored != op.out_dtype:
            write(start, sources.read(ref, start, stop).to(torch_dtype(op.out_dtype)))
            return
        values = sources.readers[ref.model].map_array(ref.tensor, start, stop)
        if not array_all_finite(values, stored):
            sources.read(ref, start, stop)  # raises the reader's error
        write(start, values)

    return Stage(sources.job(run), ranges, all_written)


_buffers = threading.local()  # each worker thread's result buffer


def buffer(nbytes: int) -> np.ndarray:
    """This thread's result buffer (bytes), at least ``nbytes`` long (kept from chunk to chunk: no page faults)."""
    found = getattr(_buffers, "out", None)
    if found is None or found.size < nbytes:
        found = _buffers.out = np.empty(nbytes, dtype=np.uint8)
    return found


def fused_merge(job: ChunkJob, kernels: ModuleType, start: int, stop: int, loop: Callable[..., tuple[bool, bool]],
                *args: Any) -> None:
    """Read a range, merge it with a fused loop (of ``kernels``), and write it as :func:`finish` would."""
    sources, op = job.sources, job.op
    assert op.base is not None
    base = sources.array(op.base, start, stop)
    out = buffer(base[0].size * 4)
    result, dtype, sources_finite, result_finite = kernels.merge_arrays(
        base, [sources.array(ref, start, stop) for ref in op.models], loop, *args, out=out)
    if not sources_finite:
        sources.check(start, stop)
    if not result_finite:
        raise MergeError(f"merged tensor {op.name!r} contains NaN or Inf ({op.method})")
    job.write(start, kernels.convert(result, dtype, op.out_dtype))
