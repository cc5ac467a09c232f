"""``shoal eval MODEL --task T``: score a model on one split of a task."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from shoal.cli._options import hub_options, threads_option, verbosity

_DTYPES = ("float32", "bfloat16", "float16")


@click.command("eval")
@click.argument("model", metavar="MODEL")
@click.option("--task", "task_name", required=True,
              help="zoo task name, jsonl:<path> or lmeval:<task>")
@click.option("--split", default="test", show_default=True,
              help="train, fitness, validation or test")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="score only the first N examples")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--dtype", type=click.Choice(_DTYPES), default="float32", show_default=True)
@click.option("--seed", type=int, default=None,
              help="seed of zoo task splits (default: the seed of MODEL's zoo world, else 0)")
@click.option("--outputs", "outputs_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="write prompt, target, output and score per example (JSONL)")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")
@hub_options
@threads_option
@verbosity
def command(model: str, task_name: str, split: str, limit: int | None, batch_size: int,
            device: str, dtype: str, seed: int | None, outputs_path: Path | None, as_json: bool,
            revision: str | None, token: str | None, threads: int, quiet: bool) -> None:
    """Score MODEL (a Hugging Face folder or id) on one split of a task.

    Prints the score with its standard error and the number of examples.
    """
    import torch
    from transformers.utils import logging as hf_logging

    from shoal.cli._options import check_revision, use_hub_token, use_threads
    from shoal.cli._progress import progress_bars
    from shoal.cli._tasks import task_seed_for
    from shoal.eval import evaluate, get_task, load_model, select_examples

    check_revision(model, revision)
    use_threads(threads)
    use_hub_token(token)
    task = get_task(task_name, seed=task_seed_for(model, seed))
    examples = select_examples(task, split, limit)  # fail on a bad split before loading
    hf_logging.disable_progress_bar()  # our own bars only
    loaded, tokenizer = load_model(model, device=device, dtype=getattr(torch, dtype), revision=revision)
    started = time.perf_counter()
    with progress_bars(enabled=not quiet and not as_json) as progress:
        result = evaluate(loaded, tokenizer, task, split, limit=limit, batch_size=batch_size,
                          progress=progress)
    seconds = time.perf_counter() - started
    if outputs_path is not None:
        with outputs_path.open("w", encoding="utf-8") as handle:
            for example, output, score in zip(examples, result.outputs, result.scores):
                handle.write(json.dumps({"prompt": example.prompt, "target": example.target,
                                         "output": output, "score": score}) + "\n")
    if as_json:
        click.echo(json.dumps({"model": model, "revision": revision, "task": result.task, "split": result.split,
                               "score": result.score, "stderr": result.stderr, "n": result.n,
                               "correct": result.correct, "seconds": round(seconds, 3)}))
    else:
        click.echo(f"{result.summary()}  [{result.n} examples, {seconds:.1f} s]")
