"""How a search scores a model: the evaluation of one or several tasks on the world's own splits.

A zoo world's specialists are trained on that world's ``train`` split, so its held-out splits
are only held out for the same seed: every score of a run reads the splits of the seed the
run's models belong with (``task_seed`` in the config, else what the task providers know
about the models, else 0).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from shoal.errors import ConfigError, TaskError
from shoal.evolve.config import EvolveConfig


def run_task_seed(config: EvolveConfig) -> int:
    """The seed of the task splits a run scores: ``config.task_seed``, else the seed of the zoo
    world its models come from, else 0."""
    if config.task_seed is not None:
        return config.task_seed
    from shoal.eval.registry import task_seed_of_models

    models = ([config.base_model] if config.base_model else []) + list(config.models)
    try:
        seed = task_seed_of_models(models)
    except TaskError as err:
        raise ConfigError(str(err)) from None
    return 0 if seed is None else seed


def _feeder(tokenizer: Any, task: Any, split: str, limit: int | None) -> Any:
    """What evaluation reads the task's examples with: a VLM's processor answers image examples,
    its tokenizer text-only ones (a text task scored on a VLM); anything else as given."""
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is None:
        return tokenizer
    from shoal.eval.evaluate import select_examples

    examples = select_examples(task, split, limit)
    return tokenizer if any(getattr(e, "images", None) for e in examples) else inner


def score_model(model: Any, tokenizer: Any, task: str | list[str], split: str, limit: int | None,
                batch_size: int, *, seed: int = 0) -> Any:
    """Score a model on one task, or on several (the mean, with the total example count), on the
    splits that ``seed`` fixes."""
    from shoal.eval import get_task
    from shoal.eval.evaluate import evaluate, result_from_scores

    names = [task] if isinstance(task, str) else list(task)
    with torch.inference_mode():
        results = []
        for name in names:
            found = get_task(name, seed=seed)
            results.append(evaluate(model, _feeder(tokenizer, found, split, limit), found, split,
                                    limit=limit, batch_size=batch_size))
    if len(results) == 1:
        return results[0]
    mean = sum(r.score for r in results) / len(results)
    return replace(result_from_scores("+".join(names), split, (), [mean]), n=sum(r.n for r in results))
