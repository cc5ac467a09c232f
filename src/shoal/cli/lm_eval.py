"""``shoal lm-eval ARGS...``: lm-eval's own command line with ``--model shoal`` registered.

lm-eval (0.4.x) finds models only in its own registry, and its ``lm_eval`` command imports
no outside package, so this command registers shoal's model and hands every argument to
lm-eval unchanged::

    shoal lm-eval --model shoal --model_args pretrained=RUN/model --tasks TASK --include_path DIR

``python -m shoal.cli.lm_eval ...`` does the same.
"""

from __future__ import annotations

import sys

import click


def run_lm_eval(args: list[str]) -> None:
    """lm-eval's ``cli_evaluate`` on ``args``, with the ``shoal`` model registered."""
    from shoal.eval.lmeval_adapter import register_lmeval_model

    register_lmeval_model()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *args]  # lm-eval's parser reads sys.argv
    cli_evaluate()


@click.command("lm-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                            "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def command(args: tuple[str, ...]) -> None:
    """Run lm-eval's command line (all ARGS are lm-eval's) with `--model shoal` available:
    any model shoal loads (layer-path models, zoo: names, run folders, adapters)."""
    run_lm_eval(list(args))


if __name__ == "__main__":  # pragma: no cover
    run_lm_eval(sys.argv[1:])
