"""``shoal demo``: the miniature world, an evolved merge for the cross task, and its controls."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from shoal.cli._options import threads_option, verbosity


@click.group("demo", invoke_without_command=True)
@click.option("--size", type=click.Choice(["micro", "small"]), default="small", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True)
@click.option("--trials", type=click.IntRange(min=1), default=120, show_default=True, help="Trials per search.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Examples per fitness/validation evaluation.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help="print the result as one JSON object (scores, grid point, paths) instead of the table")
@threads_option
@verbosity
@click.pass_context
def command(ctx: click.Context, size: str, out: Path, trials: int, limit: int | None, seed: int, as_json: bool,
            threads: int, quiet: bool) -> None:
    """Evolve a merge of the language-B and math specialists for math problems written in B.

    Stages: world build (or the cached world), uniform grid search, best source, control search,
    main search, test-score report. About 2 minutes with the small world cached on a quiet
    machine; building the small world first takes 8-18 minutes on 2 cores.

    Other demos are subcommands: ``shoal demo vlm`` (EvoVLM-JP in miniature) and ``shoal demo
    diffusion`` (EvoSDXL-JP in miniature)."""
    if ctx.invoked_subcommand is not None:
        return
    from shoal.cli._options import use_threads
    from shoal.cli._progress import print_text, progress_bars, quiet_optuna

    quiet_optuna()
    from shoal.evolve.report import markdown_table
    from shoal.studies.evolve_demo import run_demo

    use_threads(threads)
    with progress_bars(enabled=not quiet) as progress:
        result = run_demo(size=size, out=out, trials=trials, limit=limit, seed=seed, progress=progress)
    evolved = out / "evolved"
    paths = {"report": str(evolved / "report.html"), "evolved_recipe": str(evolved / "best_recipe.yaml"),
             "model": str(evolved / "model"), "fitness_plot": str(out / "fitness_runs.png")}
    if as_json:
        click.echo(json.dumps({"scores": [asdict(s) for s in result.scores], "grid_best": result.grid_best,
                               "best_fitness": result.evolved.best_fitness,
                               "best_validation": result.evolved.best_validation,
                               "trials": result.evolved.trials, **paths}))
        return
    print_text(markdown_table(result.scores))
    click.echo(f"report: {paths['report']}; evolved recipe: {paths['evolved_recipe']}; "
               f"merged model: {paths['model']}")


def _add_subcommands() -> None:
    from shoal.cli.demo_diffusion import command as diffusion
    from shoal.cli.demo_vlm import command as vlm

    command.add_command(vlm)
    command.add_command(diffusion)


_add_subcommands()
