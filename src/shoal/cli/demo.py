"""``shoal demo``: the miniature world, an evolved merge for the cross task, and its controls."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from shoal.cli._options import threads_option, verbosity


@click.command("demo")
@click.argument("which", metavar="[vlm]", type=click.Choice(["llm", "vlm"]), default="llm",
                required=False)
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
def command(which: str, size: str, out: Path, trials: int, limit: int | None, seed: int, as_json: bool,
            threads: int, quiet: bool) -> None:
    """Evolve a merge of the language-B and math specialists for math problems written in B.

    Stages: world build (or the cached world), uniform grid search, best source, control search,
    main search, test-score report. About 2 minutes with the small world cached on a quiet
    machine; building the small world first takes 8-18 minutes on 2 cores.

    `shoal demo vlm`: evolve the language model inside the world's vision-language model with
    the language-B specialist, for questions about pictures asked in B (EvoVLM-JP in
    miniature); the table's rows are scored on the test split, and a picture grid shows a few
    answers (default --out runs/demo-vlm)."""
    from shoal.cli._options import use_threads
    from shoal.cli._progress import print_text, progress_bars, quiet_optuna

    quiet_optuna()
    if which == "vlm":
        _vlm_demo(size, out, trials, limit, seed, as_json, threads, quiet)
        return
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


def _vlm_demo(size: str, out: Path, trials: int, limit: int | None, seed: int, as_json: bool, threads: int,
              quiet: bool) -> None:
    from shoal.cli._options import use_threads
    from shoal.cli._progress import print_text, progress_bars
    from shoal.studies.vlm_demo import markdown_rows, run_vlm_demo

    if out == Path("runs/demo"):
        out = Path("runs/demo-vlm")
    use_threads(threads)
    with progress_bars(enabled=not quiet) as progress:
        result = run_vlm_demo(size=size, out=out, trials=trials, limit=limit, seed=seed, progress=progress)
    if as_json:
        click.echo(json.dumps({"rows": [asdict(r) for r in result.rows], "pictures": str(result.pictures),
                               "evolved_recipe": str(result.evolved_recipe),
                               "model": str(result.model) if result.model else None}))
        return
    print_text(markdown_rows(result.rows))
    click.echo(f"pictures: {result.pictures}; evolved recipe: {result.evolved_recipe}; "
               f"merged model: {result.model}")
