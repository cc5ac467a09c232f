"""``shoal zoo``: build, find and score the miniature world."""

from __future__ import annotations

import json
from pathlib import Path

import click

from shoal.cli._options import threads_option, verbosity

_SIZES = ("micro", "small")
_KINDS = ("llm", "vlm")
kind_option = click.option(
    "--kind", type=click.Choice(_KINDS), default="llm", show_default=True,
    help="llm: the language world; vlm: the vision-language world made from it")
build_kind_option = click.option(
    "--kind", type=click.Choice(_KINDS + ("diffusion",)), default="llm", show_default=True,
    help="llm: the language world; vlm: the vision-language world made from it; diffusion: the "
         "drawing world (text-to-image pipelines)")


def _find(kind: str, size: str, seed: int, out: Path | None):
    """The finished world (or None) and the folder it lives in."""
    if kind == "vlm":
        from shoal.zoo import default_vlm_root, load_vlm_world

        return load_vlm_world(size, seed, root=out), out or default_vlm_root(size, seed)
    from shoal.zoo import default_root, load_zoo

    return load_zoo(size, seed, root=out), out or default_root(size, seed)


def _missing(kind: str, size: str, seed: int, where: Path):
    from shoal.zoo import ZooError

    flag = " --kind vlm" if kind == "vlm" else ""
    what = "VLM world" if kind == "vlm" else "world"
    return ZooError(f"no {size} {what} for seed {seed} at {where}; "
                    f"run: shoal zoo build --size {size} --seed {seed}{flag}")


@click.group("zoo")
def command() -> None:
    """The miniature world: synthetic languages, tasks, a base model and its specialists."""


@command.command("build")
@click.option("--size", type=click.Choice(_SIZES), default="small", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="world folder (default: the user's cache folder)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="rebuild even if a finished world is there")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch threads (weights are reproducible for the same count)")
@build_kind_option
@verbosity
def build(size: str, out: Path | None, seed: int, force: bool, threads: int, kind: str,
          quiet: bool) -> None:
    """Build the world (or find it in the cache) and print its folder.

    A VLM world (--kind vlm) is made from the language world of the same size and seed, which
    is built first when it is not in the cache; the drawing world (--kind diffusion) stands
    on its own."""
    from shoal.cli._progress import progress_bars
    from shoal.zoo import build_vlm_world, build_zoo

    if kind == "diffusion":
        from shoal.zoo.diffusion_build import build_drawing_world, load_drawing_world

        cached = None if force else load_drawing_world(size, seed, root=out)
        builder = build_drawing_world
    else:
        cached = None if force else _find(kind, size, seed, out)[0]
        builder = build_vlm_world if kind == "vlm" else build_zoo
    with progress_bars(enabled=not quiet and cached is None) as progress:
        world = builder(size, out=out, seed=seed, force=force, progress=progress,
                        threads=threads)
    if cached is not None:
        click.echo(f"cached: {world.root}", err=True)
    click.echo(str(world.root))


@command.command("path")
@click.option("--size", type=click.Choice(_SIZES), default="small", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@kind_option
@verbosity
def path(size: str, seed: int, kind: str, quiet: bool) -> None:
    """Print the folder of a cached world (exit 2 when it is not built)."""
    world, where = _find(kind, size, seed, None)
    if world is None:
        raise _missing(kind, size, seed, where)
    click.echo(str(world.root))


@command.command("tasks")
@verbosity
def tasks(quiet: bool) -> None:
    """List the zoo tasks: the language world's, then the image tasks of the VLM world."""
    from shoal.zoo import IMAGE_TASKS, ZOO_TASKS

    for name, spec in ZOO_TASKS.items():
        note = "  (held out: no specialist trains on it)" if spec.held_out else ""
        click.echo(f"{name:8}  {spec.description}{note}")
    for name, image_spec in IMAGE_TASKS.items():
        note = "  (held out: no model trains on it)" if image_spec.held_out else ""
        click.echo(f"{name:8}  [image] {image_spec.description}{note}")


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
@kind_option
@verbosity
def card(size: str, seed: int, out: Path | None, split: str, limit: int | None, as_json: bool,
         threads: int, kind: str, quiet: bool) -> None:
    """Print the score card: every model x every task, with example counts (--kind vlm: the
    VLM on the image tasks, ROUGE-L with the exact-match rate)."""
    from shoal.cli._options import use_threads
    from shoal.cli._progress import print_text, progress_bars
    from shoal.zoo.card import score_card

    world, where = _find(kind, size, seed, out)
    if world is None:
        raise _missing(kind, size, seed, where)
    use_threads(threads)
    with progress_bars(enabled=not quiet and not as_json) as progress:
        result = score_card(world, split=split, limit=limit, progress=progress)
    if as_json:
        click.echo(json.dumps({"split": result.split, "scores": {
            m: {t: {"score": c.score, "stderr": c.stderr, "n": c.n,
                    **({} if c.exact is None else {"exact": c.exact})} for t, c in row.items()}
            for m, row in result.cells.items()}}))
    else:
        print_text(result.markdown())
