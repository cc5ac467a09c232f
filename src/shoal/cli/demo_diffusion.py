"""``shoal demo diffusion``: an evolved per-block merge that draws from language-B prompts in one step."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from shoal.cli._options import threads_option, verbosity


@click.command("diffusion")
@click.option("--size", type=click.Choice(["micro", "small"]), default="small", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("runs/demo-diffusion"), show_default=True)
@click.option("--evaluations", type=click.IntRange(min=1), default=120, show_default=True,
              help="fitness evaluations per search (the evolved and the uniform search alike)")
@click.option("--test-copies", type=click.IntRange(min=1), default=8, show_default=True,
              help="noise seeds per test prompt")
@click.option("--seed", type=int, default=0, show_default=True, help="the drawing world's seed")
@click.option("--search-seed", type=int, default=None,
              help="the CMA-ES sampler's seed (default: the world's seed)")
@click.option("--genes", type=click.Choice(["blocks", "parts"]), default="blocks", show_default=True,
              help="the evolved search's genes, per specialist: one per UNet block and text-encoder "
                   "layer (blocks), or one per UNet part (down / middle / up / the rest) and one for "
                   "the text encoder (parts)")
@click.option("--json", "as_json", is_flag=True,
              help="print the rows as one JSON object instead of the table")
@threads_option
@verbosity
def command(size: str, out: Path, evaluations: int, test_copies: int, seed: int,
            search_seed: int | None, genes: str, as_json: bool, threads: int, quiet: bool) -> None:
    """EvoSDXL-JP in miniature: merge the drawing world's language-B specialist and its one-step
    specialist, block by block, for language-B prompts at one step.

    Builds the drawing world first when it is not cached (micro: about a minute; small: about
    20 minutes on 2 cores). Writes report.md, grid.png, evolved_recipe.yaml and trace.json.
    Both searches are kept in OUT/study.db: run the same command again to resume a search that
    was stopped (other settings in the same OUT are refused)."""
    from shoal.cli._options import use_threads
    from shoal.cli._progress import print_text, progress_bars, quiet_optuna
    from shoal.studies.diffusion_demo import run_diffusion_demo

    quiet_optuna()
    use_threads(threads)
    with progress_bars(enabled=not quiet) as progress:
        result = run_diffusion_demo(size=size, seed=seed, out=out, evaluations=evaluations,
                                    test_copies=test_copies, genes=genes, search_seed=search_seed,
                                    progress=progress)
    paths = {"report": str(out / "report.md"), "grid": str(out / "grid.png"),
             "evolved_recipe": str(out / "evolved_recipe.yaml"), "trace": str(out / "trace.json")}
    if as_json:
        rows = [{"label": r.label, "steps": r.steps,
                 **{k: v for k, v in asdict(r.score).items() if k != "hits"}} for r in result.rows]
        paired = [asdict(d) for d in result.paired]
        click.echo(json.dumps({"rows": rows, "paired": paired,
                               "uniform_weight": result.uniform_weight,
                               "evaluations": result.evaluations, **paths}))
        return
    print_text(result.markdown())
    click.echo(f"report: {paths['report']}; grid: {paths['grid']}; "
               f"evolved recipe: {paths['evolved_recipe']}")
