"""``shoal`` entry point.

Every module in ``shoal.cli`` that defines a click command named ``command`` becomes a
subcommand. Modules import heavy dependencies inside their command functions, so ``shoal
--help`` stays fast.

Exit codes (the README's "Exit codes" paragraph): 0 success; 1 a bug (a traceback);
2 bad data -- a file, recipe, config, model or task the command cannot use (a ``ShoalError``,
one line on stderr); 64 a usage error -- an unknown option, a bad option value, options that do
not go together (``EX_USAGE`` of sysexits.h; click's own default would be 2, the same as bad
data); 130 interrupted.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import click

import shoal
from shoal.cli._errors import cli_message
from shoal.errors import ShoalError


EXIT_BAD_DATA = 2
EXIT_USAGE = 64
EXIT_INTERRUPTED = 130
# optional packages -> the extra that installs them (pyproject.toml): a command that reaches one
# that is missing says which extra to install instead of printing a traceback
OPTIONAL_EXTRAS = {"diffusers": "diffusion", "optuna": "evolve", "cmaes": "evolve", "matplotlib": "evolve",
                   "ray": "ray", "peft": "peft", "lm_eval": "lmeval"}


class _ShoalGroup(click.Group):
    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: object) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)  # type: ignore[arg-type]
        except click.UsageError as err:
            err.exit_code = EXIT_USAGE
            raise

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except click.UsageError as err:  # raised while parsing a subcommand's arguments, or by a command
            err.exit_code = EXIT_USAGE
            raise
        except ShoalError as err:
            # one line, whatever the message holds (a path or a quoted library message may span lines)
            click.echo(f"error: {' '.join(cli_message(str(err)).split())}", err=True)
            ctx.exit(EXIT_BAD_DATA)
        except ModuleNotFoundError as err:
            extra = OPTIONAL_EXTRAS.get((err.name or "").split(".")[0])
            if extra is None:
                raise
            click.echo(f"error: this command needs {err.name.split('.')[0]}, which is not installed: "
                       f"pip install 'shoal[{extra}]'", err=True)
            ctx.exit(EXIT_BAD_DATA)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)


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
