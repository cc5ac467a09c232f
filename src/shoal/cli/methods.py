"""``shoal methods``: the registered merge methods and their parameters."""

from __future__ import annotations

import click

from shoal.cli._options import verbosity


@click.command("methods")
@verbosity
def command(quiet: bool) -> None:
    """List the registered merge methods, their parameters (default, evolvable range) and papers."""
    from shoal.merge.registry import all_methods

    for spec in all_methods():
        click.echo(f"{spec.name}  ({spec.base_role}; {spec.paper})")
        if spec.summary:
            click.echo(f"    {spec.summary}")
        for p in spec.params:
            scope = "per model" if p.per_model else "global"
            span = f", range [{p.low:g}, {p.high:g}]" if p.evolvable else ""
            default = "auto (see the method)" if p.default is None else p.default
            click.echo(f"    {p.name:<12} {scope:<9} default {default}{span}  {p.doc}")
