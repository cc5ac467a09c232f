"""``shoal merge RECIPE OUT``.

mergekit's flags that users type from habit are accepted where they mean what a shoal flag (or
shoal's default) means: ``--out-shard-size`` (= ``--shard-size``, mergekit's K/M/B suffixes
included), ``--cuda``/``--no-cuda`` (= ``--device cuda``/``cpu``), ``--random-seed`` (= ``--seed``),
``--copy-tokenizer`` (shoal always writes the tokenizer), ``--lazy-unpickle`` (shoal reads
weights lazily anyway), ``--allow-crimes`` (shoal does not refuse mixed architectures; shapes
must still agree), ``--trust-remote-code`` (a merge runs no model code). ``--no-copy-tokenizer``
has no shoal counterpart and is refused with one line.

A file of several recipes (``---`` separated, every one but the final merge with a ``name``:
mergekit-multi's format, :mod:`shoal.merge.multi_stage`) runs stage by stage; the final merge is
written to OUT, the named stages to ``--intermediate-dir`` (kept, and skipped on a rerun when
complete) or, without it, to a temporary folder beside OUT that is removed afterwards.
``shoal merge-multi`` is mergekit-multi's own command line.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import click

from shoal.cli._options import verbosity
from shoal.cli._progress import progress_bars

_NO_EFFECT_HELP = "mergekit's flag, accepted: shoal's default behaviour"


def _refuse_no_copy_tokenizer(ctx: click.Context, param: click.Parameter, value: bool | None) -> bool | None:
    if value is False:
        raise click.UsageError("--no-copy-tokenizer: shoal always writes the tokenizer of the recipe's "
                               "tokenizer_source (default: the base model); there is no shoal flag to skip it")
    return value


@click.command("merge")
@click.argument("recipe", type=click.Path(path_type=Path))  # a folder or a missing file: one line from load_recipe
@click.argument("out", type=click.Path(path_type=Path))  # a file in the way: one line from the staging
@click.option("--device", default=None, help="cpu, cuda or cuda:N: where the math runs  [default: cpu]")
@click.option("--cuda/--no-cuda", "cuda", default=None, help="mergekit's spelling of --device cuda / --device cpu")
@click.option("--shard-size", "--out-shard-size", "shard_size", default="5GB", show_default=True,
              help="largest shard in bytes: 2000000000, 500MB, 2GiB, or mergekit's 5B (five billion; "
                   "K, M, B are thousands, millions, billions of bytes)")
@click.option("--seed", "--random-seed", "seed", type=int, default=0, show_default=True,
              help="seed for random methods (DARE, DELLA) when the recipe sets none")
@click.option("--allow-pickle", is_flag=True,
              help="read .bin/.pt weights (torch.load with weights_only=True)")
@click.option("--dry-run", is_flag=True, help="print the plan (tensors, methods, sizes, mode) and write nothing")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@click.option("--json", "as_json", is_flag=True, help='print {"out", "tensors", "bytes"} as one JSON object')
@click.option("--intermediate-dir", "-I", type=click.Path(path_type=Path), default=None,
              help="multi-stage recipes: where the named stages are written (kept; complete ones are not merged "
                   "again)  [default: a temporary folder beside OUT]")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=None, hidden=True,
              callback=_refuse_no_copy_tokenizer, expose_value=False)
@click.option("--lazy-unpickle", is_flag=True, hidden=True, expose_value=False, help=_NO_EFFECT_HELP)
@click.option("--allow-crimes", is_flag=True, hidden=True, expose_value=False, help=_NO_EFFECT_HELP)
@click.option("--trust-remote-code", is_flag=True, hidden=True, expose_value=False, help=_NO_EFFECT_HELP)
@verbosity
def command(recipe: Path, out: Path, device: str | None, cuda: bool | None, shard_size: str, seed: int,
            allow_pickle: bool, dry_run: bool, overwrite: bool, as_json: bool, intermediate_dir: Path | None,
            quiet: bool) -> None:
    """Merge the models of RECIPE (mergekit-style YAML) into a Hugging Face folder OUT.

    mergekit's --out-shard-size, --cuda, --random-seed, --copy-tokenizer, --lazy-unpickle,
    --allow-crimes and --trust-remote-code are accepted as well.
    """
    import gc

    from shoal.runtime import collection_paused, runtime_settings, settle

    device = _device(device, cuda)
    # No automatic collections for the whole command: the imports (torch's, and numba's on the planning
    # thread) make about a million lasting objects and the merge frees its tensors by reference count,
    # so collections meanwhile only walk objects that are no garbage. Leaving, the settings are put back
    # (which unfreezes), then everything alive is frozen again before collections resume: the first
    # collection after them, and the interpreter's last one at exit, skip those objects.
    with ExitStack() as scope:
        scope.enter_context(collection_paused())
        scope.callback(gc.freeze)
        scope.enter_context(runtime_settings(gc="freeze", trim_allocator=True, numba_blas_probe=False))
        from shoal.checkpoint import parse_byte_size
        from shoal.merge import load_recipe, merge
        from shoal.merge.execute import open_sources
        from shoal.merge.plan import plan_merge
        settle()

        size = parse_byte_size(shard_size)
        from shoal.merge.multi_stage import read_documents

        if recipe.is_file() and len(read_documents(recipe)) > 1:
            _merge_stages(recipe, out, intermediate_dir, dry_run=dry_run, overwrite=overwrite, quiet=quiet or as_json,
                          as_json=as_json, options=dict(shard_size=size, device=device, seed=seed,
                                                        allow_pickle=allow_pickle))
            return
        if intermediate_dir is not None:
            raise click.UsageError("--intermediate-dir: RECIPE is a single recipe; the option is for multi-stage "
                                   "recipes (several documents)")
        parsed = load_recipe(recipe)
        if dry_run:
            with ExitStack() as stack:
                readers = open_sources(parsed, allow_pickle=allow_pickle, stack=stack)
                plan = plan_merge(parsed, readers, seed=seed)
            _print_warnings(plan)
            _print_plan(plan)
            return
        _check_device(device)
        _check_out(out, overwrite)
        with progress_bars(enabled=not quiet and not as_json) as progress:
            result = merge(parsed, out, shard_size=size, device=device, seed=seed, allow_pickle=allow_pickle,
                           overwrite=overwrite, progress=progress, on_plan=_print_warnings)
    if as_json:
        click.echo(json.dumps({"out": str(result.out), "tensors": result.tensors, "bytes": result.total_bytes}))
    else:
        click.echo(f"wrote {result.tensors} tensors ({_human(result.total_bytes)}) to {result.out}")


def _merge_stages(recipe: Path, out: Path, intermediate_dir: Path | None, *, dry_run: bool, overwrite: bool,
                  quiet: bool, as_json: bool, options: dict) -> None:
    """A multi-stage recipe: its final merge into ``out``, the named stages into ``intermediate_dir``."""
    import shutil
    import tempfile

    from shoal.errors import RecipeError
    from shoal.merge.multi_stage import parse_stages, read_documents

    folder = intermediate_dir or Path("(a temporary folder beside OUT)")
    stages = parse_stages(read_documents(recipe), folder, where=str(recipe))
    if all(stage.name is not None for stage in stages):
        raise RecipeError(f"{recipe}: every stage has a name, so none would be written to OUT; leave the "
                               "final merge's name out, or run shoal merge-multi")
    if dry_run:
        print_stages(stages, folder, out)
        return
    _check_device(options["device"])
    _check_out(out, overwrite)
    temporary = None
    if intermediate_dir is None:
        out.expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{out.name}.stages-", dir=out.expanduser().absolute().parent))
        stages = parse_stages(read_documents(recipe), temporary, where=str(recipe))
    try:
        results = run_stage_list(stages, temporary or folder, out, lazy=True, lazy_final=False, overwrite=overwrite,
                                 quiet=quiet, options=options)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    report_stages(results, as_json=as_json)


def print_stages(stages, folder: Path, out: Path | None) -> None:  # type: ignore[no-untyped-def]
    """The dry run of a multi-stage recipe: each stage, where it goes and what it needs (no tensor plans)."""
    click.echo(f"multi-stage recipe: {len(stages)} stages, in this order")
    for stage in stages:
        target = folder / stage.name if stage.name is not None else out
        needs = f" (after {', '.join(stage.needs)})" if stage.needs else ""
        click.echo(f"  {stage.label}: {stage.recipe.merge_method} -> {target}{needs}")


def run_stage_list(stages, folder: Path, out: Path | None, *, lazy: bool, lazy_final: bool,  # type: ignore[no-untyped-def]
                   overwrite: bool, quiet: bool, options: dict):
    from shoal.merge.multi_stage import run_stages

    def announce(stage, target: Path) -> None:  # type: ignore[no-untyped-def]
        if not quiet:
            click.echo(f"stage {stage.label} -> {target}", err=True)

    with progress_bars(enabled=not quiet) as progress:
        return run_stages(stages, intermediate_dir=folder, out=out, lazy=lazy, lazy_final=lazy_final,
                          overwrite=overwrite, on_stage=announce, progress=progress, on_plan=_print_warnings,
                          **options)


def report_stages(results, *, as_json: bool) -> None:  # type: ignore[no-untyped-def]
    if as_json:
        click.echo(json.dumps([{"stage": r.stage.name, "out": str(r.out), "skipped": r.skipped, "tensors": r.tensors,
                                "bytes": r.total_bytes} for r in results]))
        return
    for r in results:
        if r.skipped:
            click.echo(f"stage {r.stage.label}: {r.out} is complete, not merged again")
        else:
            click.echo(f"stage {r.stage.label}: wrote {r.tensors} tensors ({_human(r.total_bytes)}) to {r.out}")


def _device(device: str | None, cuda: bool | None) -> str:
    if device is not None and cuda is not None:
        implied = "cuda" if cuda else "cpu"
        if not device.startswith(implied):
            raise click.UsageError(f"--device {device} and --{'' if cuda else 'no-'}cuda disagree; give one")
    if device is not None:
        return device
    return "cuda" if cuda else "cpu"


def _check_device(device: str) -> None:
    from shoal.errors import MergeError

    if device == "cpu":  # no torch needed to know (the fused path runs without it)
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise MergeError(f"--device {device}: not a device shoal merges on; use cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise MergeError(f"--device {device}: CUDA is not available on this machine")


def _check_out(out: Path, overwrite: bool) -> None:
    from shoal.errors import CheckpointError

    if not overwrite and out.is_dir() and not out.is_symlink() and any(out.iterdir()):
        raise CheckpointError(f"{out}: output folder exists and is not empty; choose another OUT or pass "
                              "--overwrite to replace it")


def _print_warnings(plan) -> None:  # type: ignore[no-untyped-def]
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)


def _print_plan(plan) -> None:  # type: ignore[no-untyped-def]
    """One line per output tensor; plain text so it can be read, grepped and diffed."""
    from shoal.merge.plan_modes import mode_lines
    from shoal.merge.registry import get_method

    rows = [("tensor", "method", "shape", "dtype", "sources", "parameters")]
    for op in plan.ops:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in op.params)
        sources = ", ".join(ref.model for ref in op.sources)
        rows.append((op.name, op.method, "x".join(map(str, op.shape)),
                     str(op.out_dtype).replace("torch.", ""), sources, params or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    click.echo(f"merge plan: {plan.method}, output follows {plan.reference}")
    for line in mode_lines(plan.recipe, get_method(plan.method)):
        click.echo(line)
    if plan.components:  # a diffusion pipeline
        modes = ", ".join(f"{name} {mode}" for name, mode in plan.components)
        click.echo(f"components ({plan.output_layout}): {modes}")
    if plan.vocabulary is not None:
        vocab = plan.vocabulary
        click.echo(f"vocabulary: {len(vocab.tokens)} tokens, {vocab.size} rows; per-token tensors aligned by token: "
                   + ", ".join(sorted({name for names in vocab.aligned.values() for name in names})))
    for row in rows:
        click.echo("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5])
    click.echo(f"{len(plan.ops)} tensors, {_human(plan.total_bytes)} to write, "
               f"config changes: {dict(plan.config_updates) or 'none'}")


def _fmt(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "auto"
    return str(value)


def _human(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{count} B"
