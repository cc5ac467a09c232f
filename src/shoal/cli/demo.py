"""``shoal demo``: the miniature world, an evolved merge for the cross task, and its controls."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo")
@click.option("--size", type=click.Choice(["micro", "small"]), default="small", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True)
@click.option("--trials", type=int, default=120, show_default=True, help="Trials per search.")
@click.option("--limit", type=int, default=None, help="Examples per fitness/validation evaluation.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", "-q", is_flag=True)
def command(size: str, out: Path, trials: int, limit: int | None, seed: int, quiet: bool) -> None:
    """Evolve a merge of the language-B and math specialists for math problems written in B."""
    from shoal.cli._progress import progress_bars, quiet_optuna, stdout

    quiet_optuna()
    from shoal.studies.evolve_demo import run_demo
    from shoal.evolve.report import markdown_table

    with progress_bars(enabled=not quiet) as progress:
        result = run_demo(size=size, out=out, trials=trials, limit=limit, seed=seed, progress=progress)
    stdout.print(markdown_table(result.scores))
    click.echo(f"report: {out / 'evolved' / 'report.html'}; evolved recipe: "
               f"{out / 'evolved' / 'best_recipe.yaml'}; merged model: {out / 'evolved' / 'model'}")
