"""``shoal merge RECIPE OUT``."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import click

from shoal.cli._progress import progress_bars


@click.command("merge")
@click.argument("recipe", type=click.Path(path_type=Path))  # a folder or a missing file: one line from load_recipe
@click.argument("out", type=click.Path(path_type=Path))  # a file in the way: one line from the staging
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N: where the math runs.")
@click.option("--shard-size", default="5GB", show_default=True,
              help="Largest shard, in bytes or with a unit (500MB, 2GiB).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for random methods (DARE, DELLA) when the recipe sets none.")
@click.option("--allow-pickle", is_flag=True,
              help="Read .bin/.pt weights (torch.load with weights_only=True).")
@click.option("--dry-run", is_flag=True, help="Print the plan (tensors, methods, sizes) and write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def command(recipe: Path, out: Path, device: str, shard_size: str, seed: int, allow_pickle: bool,
            dry_run: bool, overwrite: bool, quiet: bool) -> None:
    """Merge the models of RECIPE (mergekit-style YAML) into a Hugging Face folder OUT."""
    import gc

    from shoal.runtime import collection_paused, runtime_settings, settle

    with runtime_settings(gc="freeze", trim_allocator=True):
        # torch's import makes about a million lasting objects: collections meanwhile find no garbage
        with collection_paused():
            from shoal.checkpoint import parse_byte_size
            from shoal.merge import load_recipe, merge
            from shoal.merge.execute import open_sources
            from shoal.merge.plan import plan_merge
        settle()

        size = parse_byte_size(shard_size)
        parsed = load_recipe(recipe)
        if dry_run:
            with ExitStack() as stack:
                readers = open_sources(parsed, allow_pickle=allow_pickle, stack=stack)
                plan = plan_merge(parsed, readers, seed=seed)
            _print_plan(plan)
            return
        _check_device(device)
        with progress_bars(enabled=not quiet) as progress:
            result = merge(parsed, out, shard_size=size, device=device, seed=seed,
                           allow_pickle=allow_pickle, overwrite=overwrite, progress=progress)
    gc.freeze()  # the interpreter's last collection at exit then skips the objects alive now
    click.echo(f"wrote {result.tensors} tensors ({_human(result.total_bytes)}) to {result.out}")


def _check_device(device: str) -> None:
    import torch

    from shoal.errors import MergeError

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise MergeError(f"--device {device}: not a device shoal merges on; use cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise MergeError(f"--device {device}: CUDA is not available on this machine")


def _print_plan(plan) -> None:  # type: ignore[no-untyped-def]
    """One line per output tensor; plain text so it can be read, grepped and diffed."""
    rows = [("tensor", "method", "shape", "dtype", "sources", "parameters")]
    for op in plan.ops:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in op.params)
        sources = ", ".join(ref.model for ref in op.sources)
        rows.append((op.name, op.method, "x".join(map(str, op.shape)),
                     str(op.out_dtype).replace("torch.", ""), sources, params or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    click.echo(f"merge plan: {plan.method}, output follows {plan.reference}")
    for row in rows:
        click.echo("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5])
    click.echo(f"{len(plan.ops)} tensors, {_human(plan.total_bytes)} to write, "
               f"config changes: {dict(plan.config_updates) or 'none'}")


def _fmt(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _human(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{count} B"
