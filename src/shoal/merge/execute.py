"""Run a merge plan: tensor by tensor, streamed into a staged output folder."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from shoal.checkpoint import (CheckpointReader, ShardedWriter, copy_support_files, open_checkpoint,
                              staged_output, write_model_card)
from shoal.errors import MergeError
from shoal.merge.plan import COPY, MergePlan, SourceRef, TensorOp, plan_merge
from shoal.merge.recipe import Recipe, load_recipe
from shoal.merge.registry import get_method
from shoal.progress import ProgressFn, no_progress

DEFAULT_SHARD_SIZE = 5 * 2**30
IN_FLIGHT = 3  # streamed ops started ahead of the one waited for

Fetch = Callable[[SourceRef], torch.Tensor]


@dataclass(frozen=True)
class MergeResult:
    """What a finished merge wrote."""

    out: Path
    tensors: int
    total_bytes: int
    plan: MergePlan


def compute_op(op: TensorOp, fetch: Fetch, *, compat: str = "paper",
               device: str | torch.device = "cpu") -> torch.Tensor:
    """The output tensor of one operation, in its output dtype (on ``device``)."""
    if op.method == COPY:
        result = fetch(op.models[0])
    else:
        method = get_method(op.method)
        base = fetch(op.base) if op.base is not None else None
        models = [fetch(ref) for ref in op.models]
        kwargs = op.kwargs()
        if method.uses_generator:
            # a CPU generator whatever the device: a seed draws the same masks on the CPU and on a GPU
            kwargs["generator"] = torch.Generator().manual_seed(op.seed)
        if method.has_compat:
            kwargs["compat"] = compat
        result = method.fn(base, models, **kwargs)
        if not torch.isfinite(result).all():
            raise MergeError(f"merged tensor {op.name!r} contains NaN or Inf ({op.method})")
    return result.to(op.out_dtype)


def open_sources(recipe: Recipe, *, allow_pickle: bool = False,
                 stack: ExitStack) -> dict[str, CheckpointReader]:
    """Open every model the recipe names (closed when ``stack`` closes).

    ``zoo:SIZE/NAME`` names a model of the miniature world, built on first use."""
    readers: dict[str, CheckpointReader] = {}
    for name in recipe.source_models():
        location = name
        if name.startswith("zoo:"):
            from shoal.zoo import resolve_zoo_ref

            location = resolve_zoo_ref(name)
        readers[name] = stack.enter_context(open_checkpoint(location, allow_pickle=allow_pickle))
    return readers


def make_fetch(readers: Mapping[str, CheckpointReader], device: str | torch.device) -> Fetch:
    def fetch(ref: SourceRef) -> torch.Tensor:
        return readers[ref.model].get(ref.tensor, device=device)

    return fetch


def execute_plan(plan: MergePlan, readers: Mapping[str, CheckpointReader], out_dir: Path, *,
                 shard_size: int = DEFAULT_SHARD_SIZE, device: str | torch.device = "cpu",
                 progress: ProgressFn = no_progress, streamed: bool = True,
                 workers: int | None = None) -> int:
    """Write every tensor of ``plan`` into ``out_dir`` (already a staging folder); returns bytes written.

    ``streamed`` (the default) runs the fast executor: on the CPU, ops are computed in chunks
    on ``workers`` threads (default: torch's thread count) straight into pre-laid-out shard
    files (:mod:`shoal.merge.streamed`), up to ``IN_FLIGHT`` + 1 ops at a time (their passes
    queue on the pool behind each other's); ops it does not stream, and every op on a GPU, run
    whole while the next op's sources are read and the previous result is written. The
    result is bitwise the same as ``streamed=False``: one tensor at a time with
    :func:`compute_op`, the reference implementation.
    """
    if not streamed:
        return _execute_simple(plan, readers, out_dir, shard_size=shard_size, device=device,
                               progress=progress)
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    from shoal.checkpoint.writer import PlannedShardWriter
    from shoal.merge.pool import chunk_pool
    from shoal.merge.streamed import start_streamed, streamable

    compat = plan.recipe.compat
    on_cpu = torch.device(device).type == "cpu"
    stream = [on_cpu and streamable(op, readers, compat=compat) for op in plan.ops]
    writer = PlannedShardWriter(out_dir, [(op.name, op.out_dtype, op.shape) for op in plan.ops],
                                max_shard_bytes=shard_size)
    threads = torch.get_num_threads()
    total = len(plan.ops)
    finished = 0

    def done() -> None:
        nonlocal finished
        finished += 1
        progress("merge", finished, total)

    try:
        with chunk_pool(workers) as pool, ThreadPoolExecutor(2, thread_name_prefix="shoal-io") as io:
            def read_all(op: TensorOp) -> dict[SourceRef, torch.Tensor]:
                return {ref: readers[ref.model].read_whole(ref.tensor, device) for ref in op.sources}

            prefetched: dict[int, Future] = {}
            writing: Future | None = None

            def whole(i: int) -> None:
                """Op i in one piece, on ``device``, while the next op's sources are read."""
                nonlocal writing
                op = plan.ops[i]
                following = next((j for j in range(i + 1, total) if not stream[j]), None)
                if following is not None and following not in prefetched:
                    prefetched[following] = io.submit(read_all, plan.ops[following])
                sources = prefetched.pop(i).result() if i in prefetched else read_all(op)
                torch.set_num_threads(threads)  # a whole-tensor op uses torch's own threads
                try:
                    tensor = compute_op(op, sources.__getitem__, compat=compat, device=device)
                finally:
                    torch.set_num_threads(1)
                if writing is not None:
                    writing.result()
                writing = io.submit(writer.write, op.name, tensor.to("cpu"))
                del sources, tensor

            # streamed ops in flight: their passes queue up on the pool behind each other's
            in_flight: deque[tuple[int, Future]] = deque()

            def settle() -> None:
                i, future = in_flight.popleft()
                if not future.result():  # the op must run whole after all
                    whole(i)
                done()

            for i, op in enumerate(plan.ops):
                if stream[i]:
                    def write(start: int, values: torch.Tensor, name: str = op.name) -> None:
                        writer.write(name, values, start)

                    in_flight.append((i, start_streamed(op, readers, write, pool, compat=compat)))
                    while len(in_flight) > IN_FLIGHT:
                        settle()
                    continue
                whole(i)
                done()
            while in_flight:
                settle()
            if writing is not None:
                writing.result()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return plan.total_bytes


def _execute_simple(plan: MergePlan, readers: Mapping[str, CheckpointReader], out_dir: Path, *,
                    shard_size: int, device: str | torch.device, progress: ProgressFn) -> int:
    fetch = make_fetch(readers, device)
    writer = ShardedWriter(out_dir, max_shard_bytes=shard_size)
    total = len(plan.ops)
    for done, op in enumerate(plan.ops, start=1):
        tensor = compute_op(op, fetch, compat=plan.recipe.compat, device=device)
        writer.add(op.name, tensor.to("cpu"))
        progress("merge", done, total)
    writer.close()
    return plan.total_bytes


def merge(recipe: Recipe | str | Path, out: str | Path, *, shard_size: int = DEFAULT_SHARD_SIZE,
          device: str = "cpu", seed: int = 0, allow_pickle: bool = False, overwrite: bool = False,
          progress: ProgressFn = no_progress, streamed: bool = True) -> MergeResult:
    """Merge the recipe's sources into a Hugging Face model folder at ``out``.

    The folder is built next to ``out`` and moved into place only when complete: an error or a
    killed process leaves nothing at ``out``. ``streamed=False`` runs the simple reference
    executor (same result, slower, memory up to a shard).
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    _check_device(device)
    out = Path(out)
    with ExitStack() as stack:
        readers = open_sources(recipe, allow_pickle=allow_pickle, stack=stack)
        plan = plan_merge(recipe, readers, seed=seed)
        with staged_output(out, overwrite=overwrite) as stage:
            written = execute_plan(plan, readers, stage, shard_size=shard_size, device=device,
                                   progress=progress, streamed=streamed)
            write_support(plan, readers, stage, seed=seed)
    return MergeResult(out=out, tensors=len(plan.ops), total_bytes=written, plan=plan)


def write_support(plan: MergePlan, readers: Mapping[str, CheckpointReader], stage: Path, *,
                  seed: int) -> None:
    """Config, tokenizer, generation config, the recipe and the model card."""
    copy_support_files(readers[plan.reference], stage, config_updates=dict(plan.config_updates))
    if plan.tokenizer_source != plan.reference:
        _copy_tokenizer(readers[plan.tokenizer_source], stage)
    recipe = plan.recipe
    if recipe.seed is None and _uses_randomness(plan):
        recipe = recipe.model_copy(update={"seed": seed})
    recipe_yaml = recipe.to_yaml()
    write_model_card(stage, sources=plan.models_used(), method=plan.method, recipe_yaml=recipe_yaml,
                     base_model=recipe.base_model)


def _copy_tokenizer(source: CheckpointReader, stage: Path) -> None:
    """Replace the tokenizer files in ``stage`` by those of ``source`` (``tokenizer_source``)."""
    import shutil

    from shoal.checkpoint.support_files import SUPPORT_FILES

    folder = source.path if Path(source.path).is_dir() else Path(source.path).parent
    names = [n for n in SUPPORT_FILES if n != "generation_config.json"]
    if not any((folder / n).is_file() for n in names):
        raise MergeError(f"tokenizer_source {source.source}: no tokenizer files in {folder}")
    for name in names:
        if (stage / name).exists():
            (stage / name).unlink()
        if (folder / name).is_file():
            shutil.copyfile(folder / name, stage / name)


def _uses_randomness(plan: MergePlan) -> bool:
    return plan.method != COPY and get_method(plan.method).uses_generator


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeError(f"--device {device}: CUDA is not available on this machine")
