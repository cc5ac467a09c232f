"""``shoal methods``: the registered merge methods and their parameters."""

from __future__ import annotations

import click


@click.command("methods")
def command() -> None:
    """List the registered merge methods and their parameters."""
    from rich.table import Table

    from shoal.cli._progress import stdout as console
    from shoal.merge.registry import all_methods

    table = Table(title="merge methods")
    for column in ("method", "base", "per-model parameters", "global parameters", "paper"):
        table.add_column(column)
    for spec in all_methods():
        per_model = ", ".join(f"{p.name}={p.default}" for p in spec.params if p.per_model)
        global_ = ", ".join(f"{p.name}={p.default}" for p in spec.params if not p.per_model)
        table.add_row(spec.name, "yes" if spec.needs_base else "no", per_model or "-", global_ or "-",
                      spec.paper)
    console.print(table, soft_wrap=True)
