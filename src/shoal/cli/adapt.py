"""``shoal adapt MODEL --experts E1 E2 ... --strategy S``: two-pass self-adaptive inference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from shoal.cli._inputs import FILE, model_run_options, prepare_model_run

_VARIADIC = ("--experts", "--prompt")


class _VariadicCommand(click.Command):
    """Lets ``--experts A B C`` and ``--prompt P1 P2`` take several values: each value up to
    the next option becomes a repetition of the option."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rewritten: list[str] = []
        current: str | None = None
        for arg in args:
            if arg in _VARIADIC:
                current = arg
                continue
            if arg.startswith("-") and arg != "-":
                current = None
            elif current is not None:
                rewritten += [current, arg]
                continue
            rewritten.append(arg)
        return super().parse_args(ctx, rewritten)


@click.command("adapt", cls=_VariadicCommand)
@click.argument("model", metavar="MODEL")
@click.option("--experts", "experts", multiple=True, required=True, type=FILE, help="SVF expert files")
@click.option("--strategy", type=click.Choice(["prompt", "classifier", "few-shot", "base"]), default="prompt",
              show_default=True, help="how pass 1 picks the expert")
@click.option("--classifier", type=FILE, default=None,
              help="classifier expert (strategy classifier; train one with `shoal svf train-classifier`)")
@click.option("--task", "task_name", default=None, help="evaluate on this task (zoo name, jsonl:<path>, ...)")
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="first N examples only")
@click.option("--prompt", "prompts", multiple=True, help="generate answers to these prompts instead")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="generation budget for --prompt")
@click.option("--mode", type=click.Choice(["first-token", "loglik", "generate"]), default="first-token",
              show_default=True, help="how pass 1 reads the category: first-token log-likelihood (one "
              "forward pass), whole-label log-likelihood, or generating the label")
@click.option("--template", default=None, help="pass-1 prompt with {prompt} and {labels}")
@click.option("--shots", type=click.IntRange(min=1), default=10, show_default=True,
              help="labelled examples of the task for few-shot")
@click.option("--shots-split", default="fitness", show_default=True)
@click.option("--per-matrix/--per-expert", default=True, show_default=True,
              help="few-shot: one alpha per expert and matrix (the reference), or one per expert")
@click.option("--cem-iterations", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--cem-population", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--transfer", is_flag=True, help="accept experts trained on another base of the same shapes")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="CEM seed")
@model_run_options
def command(model: str, experts: tuple[Path, ...], strategy: str, classifier: Path | None, task_name: str | None,
            split: str, limit: int | None, prompts: tuple[str, ...], max_new_tokens: int, mode: str,
            template: str | None, shots: int, shots_split: str, per_matrix: bool, cem_iterations: int,
            cem_population: int, transfer: bool, batch_size: int, seed: int, task_seed: int | None,
            svd_cache: Path | None, device: str, dtype: str, as_json: bool, revision: str | None,
            token: str | None, threads: int, quiet: bool) -> None:
    """Answer with MODEL adapted by SVF EXPERTS, chosen per prompt (pass 1) before answering (pass 2).

    With --task, scores a split of the task; with --prompt, prints the answers. few-shot needs
    --task (its labelled --shots come from --shots-split)."""
    import torch

    from shoal.adapt import adapt_evaluate, adapt_generate, load_expert
    from shoal.adapt.dispatch import DEFAULT_TEMPLATE, check_roles, check_template
    from shoal.cli._progress import progress_bars
    from shoal.cli._tasks import task_seed_for
    from shoal.eval import get_task, load_model

    if not prompts and task_name is None:
        raise click.UsageError("give --task T (evaluate) or --prompt TEXT ... (generate)")
    if prompts and task_name is not None and strategy != "few-shot":
        raise click.UsageError("--prompt and --task go together only with --strategy few-shot "
                               "(the task gives the shots)")
    if strategy == "classifier" and classifier is None:
        raise click.UsageError("--strategy classifier needs --classifier EXPERT "
                               "(train one with `shoal svf train-classifier`)")
    if strategy == "few-shot" and task_name is None:
        raise click.UsageError("--strategy few-shot needs --task T for its labelled shots")
    if classifier is not None and strategy != "classifier":
        raise click.UsageError(f"--classifier goes with --strategy classifier, not {strategy}")
    prepare_model_run(model, revision, token, threads, device, svd_cache)
    template = check_template(template or DEFAULT_TEMPLATE)
    loaded_experts = [load_expert(path) for path in experts]  # each file checked before the model loads
    loaded_classifier = load_expert(classifier) if classifier is not None else None
    check_roles(loaded_experts, loaded_classifier)
    names = [expert.name for expert in loaded_experts]
    task = get_task(task_name, seed=task_seed_for(model, task_seed)) if task_name is not None else None
    common: dict[str, Any] = dict(strategy=strategy, classifier=loaded_classifier, mode=mode,
                                  template=template, per_matrix=per_matrix,
                                  cem_iterations=cem_iterations, cem_population=cem_population, seed=seed,
                                  transfer=transfer, batch_size=batch_size, cache_dir=svd_cache)
    with progress_bars(enabled=not quiet and not as_json) as progress:  # before loading: no HF bars
        loaded, tokenizer = load_model(model, device=device, dtype=getattr(torch, dtype), revision=revision)
        if prompts:
            shot_examples = list(task.examples(shots_split))[:shots] if task is not None else None
            result = adapt_generate(loaded, tokenizer, list(prompts), loaded_experts, max_new_tokens=max_new_tokens,
                                    task=task, shots=shot_examples, progress=progress, **common)
        else:
            assert task is not None
            evaluation = adapt_evaluate(loaded, tokenizer, task, split, loaded_experts, limit=limit, n_shots=shots,
                                        shots_split=shots_split, progress=progress, **common)
    if prompts:
        alpha = result.mixture.alpha.tolist() if result.mixture is not None else None
        if as_json:
            click.echo(json.dumps({"outputs": list(result.outputs), "categories": list(result.categories),
                                   "pass1_seconds": result.pass1_seconds, "pass2_seconds": result.pass2_seconds,
                                   "alpha": alpha, "alpha_by_expert": _by_name(names, alpha)}))
            return
        for category, output in zip(result.categories, result.outputs):
            click.echo(f"[{category}] {output}")
        click.echo(f"pass 1 {result.pass1_seconds:.3f} s, pass 2 {result.pass2_seconds:.3f} s"
                   + (f", alpha {_alpha_text(names, alpha)}" if alpha is not None else ""), err=True)
        return
    summary = {"task": evaluation.task, "split": evaluation.split, "strategy": evaluation.strategy,
               "score": evaluation.score, "n": evaluation.n, "categories": evaluation.categories,
               "pass1_seconds": evaluation.pass1_seconds, "pass2_seconds": evaluation.pass2_seconds,
               "alpha": evaluation.alpha, "alpha_by_expert": _by_name(names, evaluation.alpha)}
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"{evaluation.task} [{evaluation.split}] {evaluation.strategy}: {evaluation.score:.3f} "
               f"(n={evaluation.n}); experts chosen {evaluation.categories}; pass 1 {evaluation.pass1_seconds:.2f} s, "
               f"pass 2 {evaluation.pass2_seconds:.2f} s ({100 * evaluation.overhead:.0f}% overhead)"
               + (f"; alpha {_alpha_text(names, evaluation.alpha)}" if evaluation.alpha is not None else ""))


def _by_name(names: list[str], alpha: list | None) -> dict[str, Any] | None:
    """Few-shot alpha keyed by expert name (a number each, or one per matrix with --per-matrix)."""
    return None if alpha is None else dict(zip(names, alpha))


def _alpha_text(names: list[str], alpha: list) -> str:
    """Each expert's alpha by name; with one alpha per matrix (the default), their mean (the
    JSON output has every value)."""
    per_matrix = any(isinstance(a, list) for a in alpha)
    means = [sum(a) / len(a) if isinstance(a, list) else a for a in alpha]
    text = ", ".join(f"{name} {a:+.2f}" for name, a in zip(names, means))
    return text + (" (means over matrices)" if per_matrix else "")
