"""Run a merge plan: one executor for every method, streamed into a staged output folder.

Each op runs the way its method declares (:mod:`shoal.merge.registry`): in chunks on a pool
of threads when the method has a chunk planner that accepts the op's settings, else whole,
with :func:`compute_op` (the reference), while the next op's sources are read and the
previous result is written. ``backend="reference"`` runs every op whole, one at a time: the
tests compare the fast backend against it bitwise.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from shoal.checkpoint import CheckpointReader, open_checkpoint, staged_output
from shoal.checkpoint.dtypes import is_floating, torch_dtype
from shoal.checkpoint.lazy_torch import torch
from shoal.checkpoint.writer import DEFAULT_MAX_SHARD_BYTES, ShardWriter
from shoal.errors import MergeError
from shoal.merge.chunks import ChunkJob, Sources, copy_chunks
from shoal.merge.methods.randomness import EntryRandom
from shoal.merge.output import write_support
from shoal.merge.plan import COPY, MergePlan, SourceRef, TensorOp, plan_merge
from shoal.merge.recipe import Recipe, load_recipe
from shoal.merge.pool import Stage, chunk_pool, ranges_of, start_stages
from shoal.merge.registry import MethodSpec, get_method
from shoal.progress import ProgressFn, no_progress
from shoal.runtime import one_torch_thread

DEFAULT_SHARD_SIZE = DEFAULT_MAX_SHARD_BYTES

Fetch = Callable[[SourceRef], "torch.Tensor"]


@dataclass(frozen=True)
class ExecutorOptions:
    """How :func:`execute_plan` runs; none of these change what is written.

    ``backend``: ``"fast"`` (chunks where a method allows it, the rest pipelined) or
    ``"reference"`` (every op whole, one at a time). ``chunk``: entries per chunk (a multiple
    of 65536, the SLERP stats block); ``fused_chunks``: chunks per fused-loop call; ``fused``:
    use the numba loops when installed; ``workers``: pool threads (default:
    :func:`shoal.runtime.worker_threads`); ``in_flight``: chunked ops started ahead of the one
    waited for.
    """

    backend: Literal["fast", "reference"] = "fast"
    chunk: int = 1 << 16
    fused_chunks: int = 8
    fused: bool = True
    workers: int | None = None
    in_flight: int = 3

    def __post_init__(self) -> None:
        if self.backend not in ("fast", "reference"):
            raise ValueError(f"backend must be 'fast' or 'reference', got {self.backend!r}")
        if self.chunk <= 0 or self.chunk % (1 << 16) or self.fused_chunks < 1 or self.in_flight < 0:
            raise ValueError(f"bad executor options: {self}")


def randomness_for(op: TensorOp, compat: str) -> EntryRandom | torch.Generator:
    """The seed contract: counter-based draws keyed by the op's seed, or mergekit's sequential generator.

    The generator is a CPU one whatever the device, so a seed draws the same masks on a GPU.
    """
    if compat == "mergekit":
        return torch.Generator().manual_seed(op.seed)
    return EntryRandom(op.seed)


def method_kwargs(op: TensorOp, spec: MethodSpec, compat: str) -> dict[str, object]:
    """The keyword arguments of ``op``'s method function (its defaults filled in)."""
    kwargs = {**spec.defaults(), **op.kwargs()}
    kwargs.pop("generator", None)
    kwargs.pop("compat", None)
    if spec.uses_generator:
        kwargs["generator"] = randomness_for(op, compat)
    if spec.has_compat:
        kwargs["compat"] = compat
    return kwargs


def compute_op(op: TensorOp, fetch: Fetch, *, compat: str = "paper",
               device: str | torch.device = "cpu") -> torch.Tensor:
    """The output tensor of one operation, whole, in its output dtype (on ``device``): the reference."""
    if op.method == COPY:
        return fetch(op.models[0]).to(torch_dtype(op.out_dtype))
    spec = get_method(op.method)
    if op.compute_dtype is not None:  # half-precision sources widened: the result is rounded once, to out_dtype
        widen = torch_dtype(op.compute_dtype)
        fetch_stored = fetch
        fetch = lambda ref: fetch_stored(ref).to(widen)  # noqa: E731
    base = fetch(op.base) if op.base is not None else None
    result = spec.fn(base, [fetch(ref) for ref in op.models], **method_kwargs(op, spec, compat))
    if not torch.isfinite(result).all():
        raise MergeError(f"merged tensor {op.name!r} contains NaN or Inf ({op.method})")
    return result.to(torch_dtype(op.out_dtype))


def _chunked(op: TensorOp, readers: Mapping[str, CheckpointReader], writer: ShardWriter, compat: str,
             options: ExecutorOptions) -> Stage | None:
    """The first pass of ``op`` in chunks, or None when it runs whole."""
    if not all(readers[ref.model].can_read_range(ref.tensor) and is_floating(readers[ref.model].dtype_name(ref.tensor))
               for ref in op.sources):
        return None
    n = 1
    for dim in op.shape:
        n *= dim
    sources = Sources(op, readers)

    def write(start: int, values: Any) -> None:
        writer.write(op.name, values, start)

    ranges = ranges_of(n, options.chunk)
    if op.method == COPY:
        return copy_chunks(op, sources, write, ranges)
    spec = get_method(op.method)
    planner = spec.chunk_planner()
    if planner is None:
        return None
    job = ChunkJob(op, spec, method_kwargs(op, spec, compat), sources, write, ranges, options.fused,
                   options.chunk * options.fused_chunks)
    return planner(job)


def execute_plan(plan: MergePlan, readers: Mapping[str, CheckpointReader], out_dir: Path, *,
                 shard_size: int = DEFAULT_SHARD_SIZE, device: str | torch.device = "cpu",
                 progress: ProgressFn = no_progress, options: ExecutorOptions = ExecutorOptions()) -> int:
    """Write every tensor of ``plan`` into ``out_dir`` (already a staging folder); returns bytes written."""
    if plan.output_layout != "hf":  # a diffusion pipeline: one folder per component, or one file
        from shoal.merge.diffusion_output import write_pipeline_tensors

        return write_pipeline_tensors(plan, readers, out_dir, shard_size=shard_size, device=device,
                                      progress=progress, options=options)
    if plan.vocabulary is not None:  # per-token tensors rebuilt in the output vocabulary
        readers = plan.vocabulary.wrap(readers)
    return write_tensor_ops(plan.ops, readers, out_dir, compat=plan.recipe.compat, shard_size=shard_size,
                            device=device, progress=progress, options=options)


def write_tensor_ops(ops: Sequence[TensorOp], readers: Mapping[str, CheckpointReader], out_dir: Path, *,
                     compat: str = "paper", shard_size: int = DEFAULT_SHARD_SIZE, device: str | torch.device = "cpu",
                     progress: ProgressFn = no_progress, options: ExecutorOptions = ExecutorOptions(),
                     filename_prefix: str = "model") -> int:
    """Compute ``ops`` (merges, or copies: :meth:`TensorOp.copy`) into safetensors shards in ``out_dir``.

    Shards, their names and the index are those of the op order and ``shard_size``, whatever
    the backend (``filename_prefix``: ``PREFIX.safetensors``, ``PREFIX-00001-of-00002.safetensors``).
    Returns the bytes of tensor data written.
    """
    writer = ShardWriter(out_dir, [(op.name, op.out_dtype, op.shape) for op in ops], max_shard_bytes=shard_size,
                         filename_prefix=filename_prefix)
    total = len(ops)
    with writer:
        if options.backend == "reference":
            fetch: Fetch = lambda ref: readers[ref.model].get(ref.tensor, device=device)  # noqa: E731
            for done, op in enumerate(ops, start=1):
                writer.write(op.name, compute_op(op, fetch, compat=compat, device=device).to("cpu"))
                progress("merge", done, total)
        else:
            _run_fast(ops, readers, writer, compat, device, progress, options)
    return sum(op.nbytes for op in ops)


def _run_fast(ops: Sequence[TensorOp], readers: Mapping[str, CheckpointReader], writer: ShardWriter, compat: str,
              device: str | torch.device, progress: ProgressFn, options: ExecutorOptions) -> None:
    on_cpu = _device_type(device) == "cpu"
    total = len(ops)
    finished = 0

    def done() -> None:
        nonlocal finished
        finished += 1
        progress("merge", finished, total)

    # Each op's serial first steps (a planner's, e.g. the TIES sample) run on a thread of their own with
    # one torch thread: torch threads of the caller's would wait for work, busy, beside the pool's workers.
    def plan_chunks(op: TensorOp) -> Stage | None:
        one_torch_thread()
        return _chunked(op, readers, writer, compat, options)

    with chunk_pool(options.workers) as pool, ThreadPoolExecutor(2, thread_name_prefix="shoal-io") as io, \
            ThreadPoolExecutor(1, thread_name_prefix="shoal-plan") as planning:
        def read_all(op: TensorOp) -> dict[SourceRef, torch.Tensor]:
            return {ref: readers[ref.model].get(ref.tensor, device=device) for ref in op.sources}

        prefetched: dict[int, Future] = {}
        writing: list[Future] = []
        stages: dict[int, Stage | None] = {}  # planned one op ahead (a plan may read, e.g. the TIES sample)

        def stage_of(i: int) -> Stage | None:
            if i not in stages:
                stages[i] = planning.submit(plan_chunks, ops[i]).result() if on_cpu else None
            return stages[i]

        def whole(i: int) -> None:
            """Op i in one piece, on ``device``, while the next op's sources are read if it runs whole too."""
            following = i + 1
            if following < total and stage_of(following) is None and following not in prefetched:
                prefetched[following] = io.submit(read_all, ops[following])
            sources = prefetched.pop(i).result() if i in prefetched else read_all(ops[i])
            tensor = compute_op(ops[i], sources.__getitem__, compat=compat, device=device)
            if writing:
                writing.pop().result()
            writing.append(io.submit(writer.write, ops[i].name, tensor.to("cpu")))

        in_flight: deque[tuple[int, Future]] = deque()  # chunked ops: their passes queue behind each other's

        def settle() -> None:
            i, future = in_flight.popleft()
            if not future.result():  # the op must run whole after all
                whole(i)
            done()

        for i in range(total):
            stage = stage_of(i)
            stages.pop(i, None)
            if stage is None:
                whole(i)
                done()
                continue
            in_flight.append((i, start_stages(pool, stage)))
            while len(in_flight) > options.in_flight:
                settle()
        while in_flight:
            settle()
        if writing:
            writing.pop().result()


def open_sources(recipe: Recipe, *, allow_pickle: bool = False,
                 stack: ExitStack) -> dict[str, CheckpointReader]:
    """Open every model the recipe names (closed when ``stack`` closes).

    Names go through the one reference resolver: folders, files, hub ids (``@revision``),
    ``zoo:SIZE/NAME`` (built on first use) and evolve run folders."""
    from shoal.checkpoint.references import resolve_reference

    readers: dict[str, CheckpointReader] = {}
    for name in recipe.source_models():
        location = resolve_reference(name)
        source = location.path if location.path is not None else str(location.hub_id)
        readers[name] = stack.enter_context(open_checkpoint(source, allow_pickle=allow_pickle,
                                                            revision=location.revision))
    return readers


def _device_type(device: Any) -> str:
    """``"cpu"`` for the CPU (named without importing torch), else torch's type of ``device``."""
    if device == "cpu":
        return "cpu"
    return str(torch.device(device).type)


def check_device(device: str) -> None:
    """``device`` names a place shoal merges on (``cpu``, ``cuda``, ``cuda:N``) that this machine has."""
    if device == "cpu":
        return
    try:
        kind = _device_type(device)
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise MergeError(f"device {device!r}: shoal merges on 'cpu', 'cuda' or 'cuda:N'")
    if kind == "cuda" and not torch.cuda.is_available():
        raise MergeError(f"device {device!r}: CUDA is not available on this machine")


@dataclass(frozen=True)
class MergeResult:
    """What a finished merge wrote."""

    out: Path
    tensors: int
    total_bytes: int
    plan: MergePlan


def merge(recipe: Recipe | str | Path, out: str | Path, *, shard_size: int = DEFAULT_SHARD_SIZE,
          device: str = "cpu", seed: int = 0, allow_pickle: bool = False, overwrite: bool = False,
          progress: ProgressFn = no_progress, options: ExecutorOptions = ExecutorOptions(),
          on_plan: Callable[[MergePlan], None] | None = None) -> MergeResult:
    """Merge the recipe's sources into a Hugging Face model folder at ``out``.

    The folder is built next to ``out`` and moved into place only when complete: an error or a
    killed process leaves nothing at ``out``. ``options`` choose how it runs, never what it writes.
    ``on_plan`` is called with the plan before anything is written (its ``warnings`` are worth
    showing: parameters that have no effect, the mode a recipe runs in).
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    check_device(device)
    out = Path(out)
    with ExitStack() as stack:
        readers = open_sources(recipe, allow_pickle=allow_pickle, stack=stack)
        plan = plan_merge(recipe, readers, seed=seed)
        if on_plan is not None:
            on_plan(plan)
        with staged_output(out, overwrite=overwrite, expected_bytes=plan.total_bytes) as stage:
            # the support files need only the plan: written beside the tensors, not after them (the
            # model card's imports alone are a good part of a second); the staging folder is left
            # only once both are done, so a failure of either still leaves nothing at ``out``
            with ThreadPoolExecutor(1, thread_name_prefix="shoal-support") as support:
                supported = support.submit(write_support, plan, readers, stage, seed=seed)
                written = execute_plan(plan, readers, stage, shard_size=shard_size, device=device,
                                       progress=progress, options=options)
                supported.result()
            for reader in readers.values():  # a source replaced or rewritten meanwhile: no output
                reader.check_unchanged()
    return MergeResult(out=out, tensors=len(plan.ops), total_bytes=written, plan=plan)
