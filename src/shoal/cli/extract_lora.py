"""``shoal extract-lora --model FINETUNED --base BASE --rank R OUT``: a PEFT LoRA adapter from a fine-tune."""

from __future__ import annotations

from pathlib import Path

import click

from shoal.cli._options import verbosity
from shoal.cli._progress import progress_bars


@click.command("extract-lora")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", required=True, help="The fine-tuned model.")
@click.option("--base", "--base-model", "base", required=True, help="The model it was fine-tuned from.")
@click.option("--rank", "--max-rank", "rank", type=click.IntRange(min=1), required=True,
              help="Largest rank of a LoRA pair (a smaller matrix gets its full rank).")
@click.option("--distribute-scale/--no-distribute-scale", default=True, show_default=True,
              help="Split the singular values between lora_A and lora_B (else lora_A carries them).")
@click.option("--embed-lora/--no-embed-lora", default=False, show_default=True,
              help="LoRA on the embeddings too, instead of saving them whole.")
@click.option("--save-module", "--modules-to-save", "modules_to_save", multiple=True,
              help="Save this module (last name component, e.g. lm_head) whole; repeatable.")
@click.option("--include-regex", "-i", "include", multiple=True,
              help="Extract only modules whose name matches; repeatable.")
@click.option("--exclude-regex", "-e", "exclude", multiple=True, help="Skip modules whose name matches; repeatable.")
@click.option("--sv-epsilon", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Drop singular values at or below this.")
@click.option("--skip-undecomposable", is_flag=True, help="Leave out modules that are not linear (norms) instead "
                                                          "of saving them whole.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N: where the SVDs run.")
@click.option("--allow-pickle", is_flag=True, help="Read .bin/.pt weights (torch.load with weights_only=True).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@verbosity
def command(out: Path, model: str, base: str, rank: int, distribute_scale: bool, embed_lora: bool,
            modules_to_save: tuple[str, ...], include: tuple[str, ...], exclude: tuple[str, ...],
            sv_epsilon: float, skip_undecomposable: bool, device: str, allow_pickle: bool, overwrite: bool,
            quiet: bool) -> None:
    """Write OUT, a PEFT LoRA adapter that turns BASE into (approximately) MODEL (mergekit-extract-lora)."""
    from shoal.merge.extract_lora import extract_lora

    with progress_bars(enabled=not quiet) as progress:
        result = extract_lora(model, base, out, rank=rank, distribute_scale=distribute_scale,
                              embed_lora=embed_lora, modules_to_save=modules_to_save, include=include,
                              exclude=exclude, sv_epsilon=sv_epsilon, skip_undecomposable=skip_undecomposable,
                              device=device, allow_pickle=allow_pickle, overwrite=overwrite, progress=progress)
    whole = f", {len(result.saved_whole)} saved whole" if result.saved_whole else ""
    click.echo(f"wrote a rank-{result.rank} LoRA adapter ({len(result.lora_modules)} modules{whole}) to {result.out}")
