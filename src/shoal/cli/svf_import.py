"""``shoal svf import REF_FILE --model MODEL --out OUT``: a reference (Sakana) expert as a shoal expert."""

from __future__ import annotations

import json
from pathlib import Path

import click

from shoal.cli._inputs import FILE
from shoal.cli._options import verbosity

_DTYPES = ("float32", "bfloat16", "float16")


@click.command("import")
@click.argument("ref_file", metavar="REF_FILE", type=FILE)
@click.option("--model", "model", required=True, help="the base model the expert was trained on")
@click.option("--out", "out", required=True, type=FILE,
              help="shoal expert file to write (.safetensors)")
@click.option("--task", default=None, help="task name recorded in the expert (default: the file name)")
@click.option("--label", default=None, help="category name used by `shoal adapt` (default: the task)")
@click.option("--expect-fingerprint", default=None, help="refuse unless the model's MLP fingerprint is this")
@click.option("--svd-cache", type=FILE, default=None,
              help="SVD cache folder (default: $SHOAL_CACHE/svd or ~/.cache/shoal/svd)")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--dtype", type=click.Choice(_DTYPES), default="float32", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")
@verbosity
def import_expert(ref_file: Path, model: str, out: Path, task: str | None, label: str | None,
                  expect_fingerprint: str | None, svd_cache: Path | None, device: str, dtype: str,
                  as_json: bool, quiet: bool) -> None:
    """Convert an expert saved by SakanaAI/self-adaptive-llms (learnable_params.pt or
    policy_params.pt) for MODEL into a shoal expert (reference parametrization)."""
    import torch

    from shoal.adapt.expert import load_expert
    from shoal.adapt.import_reference import import_reference_expert
    from shoal.eval import load_model

    from shoal.cli._inputs import check_device, check_expert_output, check_input_file, check_output_folder
    from shoal.cli._progress import progress_bars

    if ref_file.is_dir():  # a missing file is the library's to report
        check_input_file(ref_file, "REF_FILE")
    check_expert_output(out)
    check_device(device)
    if svd_cache is not None:
        check_output_folder(svd_cache, "--svd-cache")
    with progress_bars(enabled=not quiet and not as_json):  # before loading: no HF bars
        loaded, _ = load_model(model, device=device, dtype=getattr(torch, dtype))
    path = import_reference_expert(ref_file, loaded, out=out, base_model=model, task=task, label=label,
                                   expect_fingerprint=expect_fingerprint, cache_dir=svd_cache)
    meta = load_expert(path).meta
    summary = {"expert": str(path), "task": meta.task, "matrices": len(meta.matrices),
               "fingerprint": meta.base_fingerprint, "parametrization": meta.parametrization}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"{path}: {len(meta.matrices)} matrices, base {meta.base_fingerprint}, reference parametrization")
