"""``shoal zoo``: build, find and score the miniature world."""

from __future__ import annotations

import json
from pathlib import Path

import click

from shoal.cli._options import threads_option, verbosity

_SIZES = ("micro", "small")


@click.group("zoo")
def command() -> None:
    """The miniature world: synthetic languages, tasks, a base model and its specialists."""


@command.command("build")
@click.option("--kind", type=click.Choice(["llm", "diffusion"]), default="llm", show_default=True,
              help="llm: the language world; diffusion: the drawing world (text-to-image pipelines)")
@click.option("--size", type=click.Choice(_SIZES), default="small", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="world folder (default: the user's cache folder)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="rebuild even if a finished world is there")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch threads (weights are reproducible for the same count)")
@verbosity
def build(kind: str, size: str, out: Path | None, seed: int, force: bool, threads: int,
          quiet: bool) -> None:
    """Build the world (or find it in the cache) and print its folder."""
    from shoal.cli._progress import progress_bars
    from shoal.zoo import build_zoo, load_zoo

    if kind == "diffusion":
        from shoal.zoo.diffusion_build import build_drawing_world, load_drawing_world

        cached = None if force else load_drawing_world(size, seed, root=out)
        with progress_bars(enabled=not quiet and cached is None) as progress:
            world = build_drawing_world(size, out=out, seed=seed, force=force, progress=progress,
                                        threads=threads)
        if cached is not None:
            click.echo(f"cached: {world.root}", err=True)
        click.echo(str(world.root))
        return
    cached = None if force else load_zoo(size, seed, root=out) if out else load_zoo(size, seed)
    with progress_bars(enabled=not quiet and cached is None) as progress:
        world = build_zoo(size, out=out, seed=seed, force=force, progress=progress,
                          threads=threads)
    if cached is not None:
        click.echo(f"cached: {world.root}", err=True)
    click.echo(str(world.root))


@command.command("path")
@click.option("--size", type=click.Choice(_SIZES), default="small", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@verbosity
def path(size: str, seed: int, quiet: bool) -> None:
    """Print the folder of a cached world (exit 2 when it is not built)."""
    from shoal.zoo import ZooError, default_root, load_zoo

    world = load_zoo(size, seed)
    if world is None:
        raise ZooError(f"no {size} world for seed {seed} at {default_root(size, seed)}; "
                       f"run: shoal zoo build --size {size} --seed {seed}")
    click.echo(str(world.root))


@command.command("tasks")
@verbosity
def tasks(quiet: bool) -> None:
    """List the zoo tasks."""
    from shoal.zoo import ZOO_TASKS

    for name, spec in ZOO_TASKS.items():
        note = "  (held out: no specialist trains on it)" if spec.held_out else ""
        click.echo(f"{name:8}  {spec.description}{note}")


@command.command("card")
@click.option("--size", type=click.Choice(_SIZES), default="small", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="world folder (default: the user's cache folder)")
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="score only the first N examples of each task")
@click.option("--json", "as_json", is_flag=True, help="print the card as JSON")
@threads_option
@verbosity
def card(size: str, seed: int, out: Path | None, split: str, limit: int | None, as_json: bool,
         threads: int, quiet: bool) -> None:
    """Print the score card: every model x every task, with example counts."""
    from shoal.cli._options import use_threads
    from shoal.cli._progress import print_text, progress_bars
    from shoal.zoo import ZooError, default_root, load_zoo
    from shoal.zoo.card import score_card

    world = load_zoo(size, seed, root=out)
    if world is None:
        where = out if out is not None else default_root(size, seed)
        raise ZooError(f"no {size} world for seed {seed} at {where}; "
                       f"run: shoal zoo build --size {size} --seed {seed}")
    use_threads(threads)
    with progress_bars(enabled=not quiet and not as_json) as progress:
        result = score_card(world, split=split, limit=limit, progress=progress)
    if as_json:
        click.echo(json.dumps({"split": result.split, "scores": {
            m: {t: {"score": c.score, "stderr": c.stderr, "n": c.n} for t, c in row.items()}
            for m, row in result.cells.items()}}))
    else:
        print_text(result.markdown())
