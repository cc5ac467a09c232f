"""``shoal demo vlm``: an evolved merge of the world's VLM with the language-B specialist."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from shoal.cli._options import threads_option, verbosity


@click.command("vlm")
@click.option("--size", type=click.Choice(["micro", "small"]), default="small", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo-vlm"),
              show_default=True)
@click.option("--trials", type=click.IntRange(min=1), default=120, show_default=True, help="Trials per search.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Examples per fitness/validation evaluation.")
@click.option("--seed", type=int, default=0, show_default=True, help="the world's seed")
@click.option("--json", "as_json", is_flag=True,
              help="print the rows as one JSON object (scores, paths) instead of the table")
@threads_option
@verbosity
def command(size: str, out: Path, trials: int, limit: int | None, seed: int, as_json: bool, threads: int,
            quiet: bool) -> None:
    """EvoVLM-JP in miniature: evolve the language model inside the world's vision-language model
    with the language-B specialist, for questions about pictures asked in B.

    The table's rows are scored on the test split; a picture grid shows a few answers. Builds the
    VLM world (and the language world under it) first when it is not cached."""
    from shoal.cli._options import use_threads
    from shoal.cli._progress import print_text, progress_bars, quiet_optuna
    from shoal.studies.vlm_demo import markdown_rows, run_vlm_demo

    quiet_optuna()
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
