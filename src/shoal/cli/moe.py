"""``shoal moe CONFIG OUT``: a mixture-of-experts model from dense experts (mergekit-moe's config)."""

from __future__ import annotations

from pathlib import Path

import click

from shoal.cli._options import verbosity
from shoal.cli._progress import progress_bars


@click.command("moe")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda or cuda:N: where the base model runs for hidden gates.")
@click.option("--shard-size", "--out-shard-size", "shard_size", default="5GB", show_default=True,
              help="Largest shard, in bytes or with a unit (500MB, 2GiB).")
@click.option("--seed", "--random-seed", "seed", type=int, default=0, show_default=True,
              help="Seed for random gates and expert noise when the config sets none.")
@click.option("--allow-pickle", is_flag=True, help="Read .bin/.pt weights (torch.load with weights_only=True).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--i-understand-this-is-not-useful-without-training", "allow_all_same", is_flag=True,
              help="Allow every expert to be the same model (a start for training, nothing more).")
@verbosity
def command(config: Path, out: Path, device: str, shard_size: str, seed: int, allow_pickle: bool,
            overwrite: bool, allow_all_same: bool, quiet: bool) -> None:
    """Build a Mixtral or Qwen2-MoE model OUT from the dense experts CONFIG names (mergekit-moe's YAML)."""
    from shoal.checkpoint import parse_byte_size
    from shoal.merge.moe import build_moe

    size = parse_byte_size(shard_size)
    with progress_bars(enabled=not quiet) as progress:
        result = build_moe(config, out, shard_size=size, device=device, seed=seed, allow_pickle=allow_pickle,
                           overwrite=overwrite, allow_all_same=allow_all_same, progress=progress)
    click.echo(f"wrote {result.architecture} with {result.experts} experts ({result.tensors} tensors, "
               f"{result.total_bytes / 2**20:.1f} MiB) to {result.out}")
