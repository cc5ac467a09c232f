"""``shoal evolve CONFIG``: evolutionary search over merge recipes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from shoal.cli._options import verbosity


@click.command("evolve")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder (default: runs/<config name>).")
@click.option("--resume", is_flag=True, help="Continue the study in the run folder.")
@click.option("--workers", type=int, default=1, show_default=True, help="Local worker processes.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--trials", type=int, default=None, help="Override search.trials (completed candidates).")
@click.option("--threads", type=int, default=None,
              help="Torch threads per evaluator process (default: the config's threads, 1).")
@click.option("--storage", default=None, help="Optuna storage URL (sqlite:///, postgresql://, journal:PATH).")
@click.option("--no-model", is_flag=True, help="Do not write the final merged model.")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")
@verbosity
def command(config: Path, run_dir: Path | None, resume: bool, workers: int, executor: str,
            trials: int | None, threads: int | None, storage: str | None, no_model: bool,
            as_json: bool, quiet: bool) -> None:
    """Evolve a merge recipe on a fitness task; pick on validation; report test scores.

    The config is checked as a whole (tasks, models, method, parameters, ranges) before the
    run folder is written; a second process on a running folder is refused."""
    from shoal.cli._progress import print_text, progress_bars, quiet_optuna

    quiet_optuna()
    from shoal.errors import ConfigError
    from shoal.evolve import load_evolve_config, parse_evolve_config
    from shoal.evolve.report import markdown_table
    from shoal.evolve.run import evolve

    for flag, value in (("--trials", trials), ("--workers", workers), ("--threads", threads)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    parsed = load_evolve_config(config)
    data = parsed.model_dump(mode="json")
    if trials is not None:
        data["search"]["trials"] = trials
    if threads is not None:
        data["threads"] = threads
    if storage is not None:
        data["storage"] = storage
    parsed = parse_evolve_config(data, where=str(config))
    run_dir = run_dir or Path("runs") / config.stem
    with progress_bars(enabled=not quiet and not as_json) as progress:
        result = evolve(parsed, run_dir, resume=resume, workers=workers, executor=executor,
                        write_model=not no_model, progress=progress)
    if as_json:
        click.echo(json.dumps({"scores": [dataclasses.asdict(s) for s in result.scores],
                               "best_fitness": result.best_fitness, "best_validation": result.best_validation,
                               "trials": result.trials, "run_dir": str(run_dir),
                               "report": str(run_dir / "report.html")}))
        return
    print_text(markdown_table(result.scores))
    click.echo(f"best fitness {result.best_fitness:.3f}"
               + (f", validation {result.best_validation:.3f}" if result.best_validation is not None else "")
               + f" after {result.trials} trials; report: {run_dir / 'report.html'}")
