"""``shoal svf train MODEL --task T``: train a Transformer² SVF expert; ``shoal svf
train-classifier`` (in ``_svf_classifier.py``): the classifier expert; ``shoal svf study``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from shoal.cli._inputs import FILE, model_run_options, prepare_model_run
from shoal.cli._options import threads_option, verbosity
from shoal.cli._svf_classifier import train_classifier



@click.group("svf")
def command() -> None:
    """Singular Value Fine-tuning experts (Transformer², arXiv 2501.06252)."""


@command.command("train")
@click.argument("model", metavar="MODEL")
@click.option("--task", "task_name", required=True, help="zoo task name, jsonl:<path> or lmeval:<task>")
@click.option("--objective", type=click.Choice(["reinforce", "sft"]), default="reinforce", show_default=True,
              help="REINFORCE with +-1 rewards, or next-token loss on the reference completions")
@click.option("--parametrization", type=click.Choice(["reference", "direct"]), default="reference",
              show_default=True, help="z = sigmoid(p) with the sum(S) rescale (Sakana's code), or z trained as is")
@click.option("--kl", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="weight of the KL(base || adapted) penalty summed over the completion (REINFORCE)")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="examples per step (at most the train split), drawn without replacement")
@click.option("--micro-batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="examples per forward/backward; gradients accumulate over the batch")
@click.option("--clip", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="gradient norm clipping")
@click.option("--eval-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="score the validation split every N steps; the best expert is kept")
@click.option("--validation-limit", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--matrices", "patterns", multiple=True,
              help="regex of the weight names to adapt (repeatable); default: the MLP matrices")
@click.option("--label", default=None, help="category name used by `shoal adapt` (default: the task name)")
@click.option("--out", "out", type=FILE, default=None,
              help="expert file (default: <task>-<objective>.safetensors)")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="continue from <out>.train-state.pt when it exists")
@click.option("--sample/--greedy", default=False, show_default=True,
              help="REINFORCE on sampled (temperature 1) or greedy completions")
@click.option("--reward-norm", is_flag=True, help="REINFORCE: standardise the rewards over each batch (a baseline)")
@click.option("--seed", type=int, default=0, show_default=True, help="batch order and sampling")
@model_run_options
def train(model: str, task_name: str, objective: str, parametrization: str, kl: float, steps: int, lr: float,
          batch_size: int, micro_batch_size: int, clip: float, eval_every: int, validation_limit: int,
          patterns: tuple[str, ...], label: str | None, out: Path | None, resume: bool, sample: bool,
          reward_norm: bool, seed: int, task_seed: int | None, svd_cache: Path | None, device: str, dtype: str,
          as_json: bool, revision: str | None, token: str | None, threads: int, quiet: bool) -> None:
    """Train an SVF expert for a task on MODEL; keeps the best checkpoint on the validation split."""
    import torch

    from shoal.adapt import OTHER, train_svf
    from shoal.cli._inputs import check_expert_output
    from shoal.cli._progress import progress_bars
    from shoal.cli._tasks import task_seed_for
    from shoal.errors import ConfigError
    from shoal.eval import get_task, load_model

    prepare_model_run(model, revision, token, threads, device, svd_cache)
    if label is not None and label.strip() in ("", OTHER):
        raise ConfigError(f"--label {label!r}: an expert's category must be a name other than {OTHER!r}")
    task = get_task(task_name, seed=task_seed_for(model, task_seed))
    out = check_expert_output(out or Path(f"{task.name.replace(':', '_').replace('/', '_')}-{objective}.safetensors"))
    with progress_bars(enabled=not quiet and not as_json) as progress:  # before loading: no HF bars
        loaded, tokenizer = load_model(model, device=device, dtype=getattr(torch, dtype), revision=revision)
        result = train_svf(loaded, tokenizer, task, out=out, objective=objective,  # type: ignore[arg-type]
                           parametrization=parametrization,  # type: ignore[arg-type]
                           kl=kl, lr=lr, steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size,
                           clip=clip, eval_every=eval_every,
                           validation_limit=validation_limit, resume=resume, seed=seed, sample=sample,
                           reward_norm=reward_norm,
                           label=label, patterns=list(patterns) or None, cache_dir=svd_cache, progress=progress)
    summary = {"expert": str(result.path), "task": task.name, "objective": objective,
               "parametrization": parametrization, "steps": result.steps,
               "best_step": result.best_step, "validation": result.best_score, "base_validation": result.base_score,
               "parameters": result.num_parameters, "seconds_per_step": round(result.seconds_per_step, 4)}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"{result.path}: validation {result.best_score:.3f} (base {result.base_score:.3f}) at step "
                   f"{result.best_step}/{result.steps}, {result.num_parameters:,} parameters, "
                   f"{result.seconds_per_step:.3f} s/step")


@command.command("study")
@click.option("--world", "size", default="small", show_default=True, help="zoo world size (micro, small)")
@click.option("--world-seed", type=int, default=0, show_default=True)
@click.option("--world-root", type=FILE, default=None,
              help="folder of a built world (default: the zoo cache)")
@click.option("--transfer-root", type=FILE, default=None,
              help="a second world of the same size (another seed): apply the experts to its base")
@click.option("--out", type=FILE, required=True, help="folder for results.json and the reports")
@click.option("--objective", type=click.Choice(["reinforce", "sft"]), default="reinforce", show_default=True,
              help="for the experts and the classifier expert")
@click.option("--parametrization", type=click.Choice(["reference", "direct"]), default="reference",
              show_default=True)
@click.option("--kl", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--micro-batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="SVF trains a batch in chunks of this size, adding their gradients (the same step)")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True)
@click.option("--classifier-lr", type=click.FloatRange(min=0, min_open=True), default=1e-2, show_default=True)
@click.option("--lora-rank", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--lora-lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--lora-objective", type=click.Choice(["sft", "reinforce"]), default="sft", show_default=True,
              help="the LoRA baseline's objective: next-token loss (our reading of the paper's baseline) or SVF's REINFORCE")
@click.option("--eval-every", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=500, show_default=True, help="test examples per task")
@click.option("--cem-iterations", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--matrices", "matrices", multiple=True,
              help="regex of the weight names SVF and LoRA adapt (repeatable); default: the MLP matrices")
@click.option("--resume", is_flag=True,
              help="continue an interrupted study in --out (same options): finished trainings are kept")
@threads_option
@verbosity
def study(size: str, world_seed: int, world_root: Path | None, transfer_root: Path | None, out: Path, objective: str,
          parametrization: str, kl: float, steps: int, batch_size: int, micro_batch_size: int, lr: float,
          classifier_lr: float,
          lora_rank: int, lora_lr: float, lora_objective: str, eval_every: int, limit: int, cem_iterations: int,
          matrices: tuple[str, ...], resume: bool, threads: int, quiet: bool) -> None:
    """Experts vs base, SVF vs LoRA, the held-out task and the two-pass overhead on a zoo world;
    writes results.json, report.md, report.html and scores.png to --out."""
    from shoal.studies.svf_report import write_report
    from shoal.studies.svf_study import StudySettings, run_study
    from shoal.cli._inputs import check_output_folder
    from shoal.cli._options import use_threads
    from shoal.cli._progress import print_text, progress_bars
    from shoal.errors import ConfigError
    from shoal.zoo import load_zoo

    check_output_folder(out, "--out")
    world = load_zoo(size, world_seed, root=world_root)
    if world is None:
        raise ConfigError(f"no built {size} world (seed {world_seed}) at {world_root or 'the zoo cache'}; "
                          f"build it with `shoal zoo build`")
    use_threads(threads)
    other = None
    if transfer_root is not None:
        other = load_zoo(size, _manifest_seed(transfer_root), root=transfer_root)
        if other is None:
            raise ConfigError(f"no built {size} world at {transfer_root}")
    settings = StudySettings(objective=objective, parametrization=parametrization, kl=kl, steps=steps,
                             batch_size=batch_size, micro_batch_size=micro_batch_size, lr=lr,
                             classifier_lr=classifier_lr, lora_rank=lora_rank, lora_lr=lora_lr, lora_objective=lora_objective,
                             eval_every=eval_every,
                             limit=limit, cem_iterations=cem_iterations, matrices=list(matrices) or None)
    with progress_bars(enabled=not quiet) as progress:
        results = run_study(world, out, settings, transfer_world=other, resume=resume, progress=progress)
    written = write_report(results, out)
    print_text(written["markdown"].read_text())
    click.echo(f"report: {written['html']}", err=True)


def _manifest_seed(root: Path) -> int:
    try:
        return int(json.loads((root / "manifest.json").read_text())["seed"])
    except (OSError, ValueError, KeyError):
        return 0


from shoal.cli.svf_import import import_expert  # noqa: E402 (the command lives in its own module)

command.add_command(import_expert)
command.add_command(train_classifier)
