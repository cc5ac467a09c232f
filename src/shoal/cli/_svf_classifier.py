"""``shoal svf train-classifier MODEL --experts E1 E2 ...``: the classifier expert of
``shoal adapt --strategy classifier``, trained to name which expert's task a prompt is from."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from shoal.cli._inputs import FILE, model_run_options, prepare_model_run
from shoal.cli.adapt import _VariadicCommand



@click.command("train-classifier", cls=_VariadicCommand)
@click.argument("model", metavar="MODEL")
@click.option("--experts", "experts", multiple=True, required=True, type=FILE,
              help="the SVF experts to route between; each names the task it was trained on")
@click.option("--other-task", "other_tasks", multiple=True,
              help="a task whose prompts should go to no expert (\"other\"); repeatable")
@click.option("--out", type=FILE, default=Path("classifier.safetensors"), show_default=True,
              help="classifier expert file to write")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-2, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--eval-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="score routing on the validation split every N steps; the best expert is kept")
@click.option("--validation-limit", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--per-task", type=click.IntRange(min=1), default=None,
              help="examples of each task per split (default: all)")
@click.option("--template", default=None,
              help="pass-1 prompt with {prompt} and {labels}; give `shoal adapt` the same one")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="continue from <out>.train-state.pt when it exists")
@click.option("--seed", type=int, default=0, show_default=True, help="batch order")
@model_run_options
def train_classifier(model: str, experts: tuple[Path, ...], other_tasks: tuple[str, ...], out: Path, steps: int,
                     lr: float, batch_size: int, eval_every: int, validation_limit: int, per_task: int | None,
                     template: str | None, resume: bool, seed: int, task_seed: int | None, svd_cache: Path | None,
                     device: str, dtype: str, as_json: bool, revision: str | None, token: str | None, threads: int,
                     quiet: bool) -> None:
    """Train a classifier expert on MODEL that names, for a prompt, which of EXPERTS should answer.

    The routing examples are the prompts of each expert's own task (next-token loss on the
    category's answer); the answers are the ones `shoal adapt` reads with MODEL's tokenizer."""
    import torch

    from shoal.adapt import load_expert, train_svf
    from shoal.adapt.dispatch import DEFAULT_TEMPLATE, check_roles, check_template, routing_task
    from shoal.adapt.expert import ExpertError
    from shoal.cli._inputs import check_expert_output
    from shoal.cli._progress import progress_bars
    from shoal.cli._tasks import task_seed_for
    from shoal.eval import get_task, load_model

    prepare_model_run(model, revision, token, threads, device, svd_cache)
    check_expert_output(out)
    template = check_template(template or DEFAULT_TEMPLATE)
    loaded_experts = [load_expert(path) for path in experts]
    check_roles(loaded_experts)
    for path, expert in zip(experts, loaded_experts):
        if not expert.meta.task:
            raise ExpertError(f"expert {path} names no task to draw routing prompts from")
    seen: dict[str, Path] = {}
    for path, expert in zip(experts, loaded_experts):
        if expert.name in seen:
            raise ExpertError(f"experts {seen[expert.name]} and {path} have the same category {expert.name!r}; "
                              f"the classifier could not tell them apart")
        seen[expert.name] = path
    for name in other_tasks:
        owner = next((path for path, e in zip(experts, loaded_experts) if e.meta.task == name), None)
        if owner is not None:
            raise ExpertError(f"--other-task {name} is the task of expert {owner}; its prompts cannot go to "
                              f"that expert and to no expert at once")
    seed_of_tasks = task_seed_for(model, task_seed)
    sources = [(e.name, get_task(e.meta.task, seed=seed_of_tasks)) for e in loaded_experts]  # type: ignore[arg-type]
    others = [get_task(name, seed=seed_of_tasks) for name in other_tasks]
    matrices = sorted({name for e in loaded_experts for name in e.z})
    with progress_bars(enabled=not quiet and not as_json) as progress:  # before loading: no HF bars
        loaded, tokenizer = load_model(model, device=device, dtype=getattr(torch, dtype), revision=revision)
        routing = routing_task(sources, other_tasks=others, template=template, per_task=per_task,
                               tokenizer=tokenizer)
        result = train_svf(loaded, tokenizer, routing, out=out, objective="sft", lr=lr, steps=steps,
                           batch_size=batch_size, eval_every=eval_every, validation_limit=validation_limit,
                           resume=resume, seed=seed, label="router",
                           patterns=[f"^{re.escape(name)}$" for name in matrices], cache_dir=svd_cache,
                           progress=progress)
    assert routing.choices is not None
    answers = dict(zip(routing.choices.categories, routing.choices.answers))
    summary = {"classifier": str(result.path), "experts": [str(p) for p in experts], "answers": answers,
               "steps": result.steps, "best_step": result.best_step, "validation": result.best_score,
               "base_validation": result.base_score, "parameters": result.num_parameters}
    if as_json:
        click.echo(json.dumps(summary))
        return
    shown = ", ".join(name if name == answer else f"{name} = {answer}" for name, answer in answers.items())
    click.echo(f"{result.path}: routing accuracy on validation {result.best_score:.3f} (base "
               f"{result.base_score:.3f}) at step {result.best_step}/{result.steps}; categories {shown}")
