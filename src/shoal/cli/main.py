"""``shoal`` entry point.

Every module in ``shoal.cli`` that defines a click command named ``command`` becomes a
subcommand. Modules import heavy dependencies inside their command functions, so ``shoal
--help`` stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import click

import shoal
from shoal.cli._errors import cli_message
from shoal.errors import ShoalError


class _ShoalGroup(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except ShoalError as err:
            click.echo(f"error: {cli_message(str(err))}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_ShoalGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(shoal.__version__, prog_name="shoal")
def cli() -> None:
    """Grow new language models out of existing ones: merge, evolve, adapt."""


def _register_commands() -> None:
    import shoal.cli as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "main":
            continue
        module = importlib.import_module(f"shoal.cli.{info.name}")
        command = getattr(module, "command", None)
        if isinstance(command, click.Command):
            cli.add_command(command)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="shoal")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
