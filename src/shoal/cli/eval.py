"""``shoal eval MODEL --task T``: score a model on one split of a task."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from shoal.cli._inputs import FILE
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
@click.option("--outputs", "outputs_path", type=FILE, default=None,
              help="write prompt, target, output and score per example (JSONL)")
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

    from shoal.cli._inputs import check_device, check_output_file
    from shoal.cli._options import check_revision, use_hub_token, use_threads
    from shoal.cli._progress import progress_bars
    from shoal.cli._tasks import task_seed_for
    from shoal.eval import evaluate, get_task, load_model, select_examples

    check_revision(model, revision)
    check_device(device)
    if outputs_path is not None:
        check_output_file(outputs_path, "--outputs")  # before the evaluation, not after it
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
        _write_atomically(outputs_path, "".join(
            json.dumps({"prompt": example.prompt, "target": example.target, "output": output, "score": score}) + "\n"
            for example, output, score in zip(examples, result.outputs, result.scores)))
    if as_json:
        click.echo(json.dumps({"model": model, "revision": revision, "task": result.task, "split": result.split,
                               "score": result.score, "stderr": result.stderr, "n": result.n,
                               "correct": result.correct, "seconds": round(seconds, 3)}))
    else:
        click.echo(f"{result.summary()}  [{result.n} examples, {seconds:.1f} s]")


def _write_atomically(path: Path, text: str) -> None:
    """``text`` to ``path`` (parents made) through a temporary file renamed over it: an
    interrupted run leaves the old file or none, not a partial one."""
    import os
    import tempfile

    from shoal.errors import ConfigError

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        raise ConfigError(f"--outputs {path}: cannot write it ({err.strerror or err})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
