"""``shoal merge-multi RECIPE --intermediate-dir DIR [--out-path OUT]``: mergekit-multi's command line.

Runs a multi-stage recipe (:mod:`shoal.merge.multi_stage`): the named stages into DIR, the final
merge (the recipe without a ``name``, if any) into OUT. ``--lazy`` (the default) skips every
stage, the final one included, whose folder is already complete, as mergekit-multi does;
``--no-lazy`` merges them again. The merge flags are ``shoal merge``'s, mergekit's spellings
included.
"""

from __future__ import annotations

from pathlib import Path

import click

from shoal.cli._options import verbosity
from shoal.cli.merge import (_NO_EFFECT_HELP, _check_device, _device, _refuse_no_copy_tokenizer, print_stages,
                             report_stages, run_stage_list)


@click.command("merge-multi")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--intermediate-dir", "-I", type=click.Path(path_type=Path), required=True,
              help="where the named stages are written")
@click.option("--out-path", type=click.Path(path_type=Path), default=None,
              help="where the final merge (the recipe without a name) is written")
@click.option("--lazy/--no-lazy", default=True, show_default=True, help="skip stages whose folder is complete")
@click.option("--device", default=None, help="cpu, cuda or cuda:N: where the math runs  [default: cpu]")
@click.option("--cuda/--no-cuda", "cuda", default=None, help="mergekit's spelling of --device cuda / --device cpu")
@click.option("--shard-size", "--out-shard-size", "shard_size", default="5GB", show_default=True,
              help="largest shard: bytes, 500MB, 2GiB, or mergekit's 5B (five billion)")
@click.option("--seed", "--random-seed", "seed", type=int, default=0, show_default=True,
              help="seed for random methods when a recipe sets none")
@click.option("--allow-pickle", is_flag=True, help="read .bin/.pt weights (torch.load with weights_only=True)")
@click.option("--dry-run", is_flag=True, help="print the stages in the order they run and write nothing")
@click.option("--json", "as_json", is_flag=True, help="print one JSON list, an object per stage")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=None, hidden=True,
              callback=_refuse_no_copy_tokenizer, expose_value=False)
@click.option("--lazy-unpickle", is_flag=True, hidden=True, expose_value=False, help=_NO_EFFECT_HELP)
@click.option("--allow-crimes", is_flag=True, hidden=True, expose_value=False, help=_NO_EFFECT_HELP)
@click.option("--trust-remote-code", is_flag=True, hidden=True, expose_value=False, help=_NO_EFFECT_HELP)
@verbosity
def command(recipe: Path, intermediate_dir: Path, out_path: Path | None, lazy: bool, device: str | None,
            cuda: bool | None, shard_size: str, seed: int, allow_pickle: bool, dry_run: bool, as_json: bool,
            quiet: bool) -> None:
    """Run a multi-stage RECIPE (mergekit-multi's format): named stages into -I DIR, the final one into --out-path."""
    from shoal.checkpoint import parse_byte_size
    from shoal.merge.multi_stage import parse_stages, read_documents

    device = _device(device, cuda)
    size = parse_byte_size(shard_size)
    stages = parse_stages(read_documents(recipe), intermediate_dir, where=str(recipe))
    if any(stage.name is None for stage in stages) and out_path is None:
        raise click.UsageError("--out-path is required: the recipe has a final merge (a recipe without a name)")
    if out_path is not None and all(stage.name is not None for stage in stages):  # mergekit-multi ignores it too
        click.echo(f"warning: --out-path {out_path} is not written: every stage of the recipe has a name", err=True)
    if dry_run:
        print_stages(stages, intermediate_dir, out_path)
        return
    _check_device(device)
    results = run_stage_list(stages, intermediate_dir, out_path, lazy=lazy, lazy_final=lazy, overwrite=False,
                             quiet=quiet or as_json, options=dict(shard_size=size, device=device, seed=seed,
                                                                  allow_pickle=allow_pickle))
    report_stages(results, as_json=as_json)
