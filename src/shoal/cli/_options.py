"""Options every command shares, defined once: ``-q/--quiet``, ``-v/--verbose``, ``--threads``.

``-v`` sends the ``shoal`` logger's records to stderr (``-v``: INFO, ``-vv``: DEBUG); without
it only warnings are shown, as Python shows them by default. ``--threads`` is torch's thread
count for the process; :func:`use_threads` is the one place a command sets it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

_HANDLER_NAME = "shoal-cli"


def _set_verbosity(ctx: click.Context, param: click.Parameter, count: int) -> int:
    if ctx.resilient_parsing:  # shell completion: no side effects
        return count
    logger = logging.getLogger("shoal")
    handler = next((h for h in logger.handlers if h.get_name() == _HANDLER_NAME), None)
    if count == 0:
        if handler is not None:
            logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        return count
    if handler is None:
        handler = logging.StreamHandler()
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    handler.setStream(sys.stderr)  # the current one (CliRunner swaps it)
    logger.setLevel(logging.INFO if count == 1 else logging.DEBUG)
    return count


def verbosity(function: F) -> F:
    """``-q/--quiet`` (passed to the command as ``quiet``: no progress bars or stage lines) and
    ``-v/--verbose`` (repeatable; sets up logging, not passed on)."""
    function = click.option("--verbose", "-v", count=True, expose_value=False, callback=_set_verbosity,
                            help="log what shoal does to stderr (-vv: debug detail)")(function)
    return click.option("--quiet", "-q", is_flag=True, help="no progress bars or stage lines")(function)


def threads_option(function: F) -> F:
    """``--threads N`` (passed as ``threads``): torch threads of this process, 1 by default —
    several threads per process slow evaluation down on a machine other jobs share."""
    return click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
                        help="torch threads (one is fastest for the small models here, and on a busy "
                             "machine)")(function)


def use_threads(threads: int) -> None:
    """Set torch's intra-op thread count for this process (the CLI's business, not the library's)."""
    import torch

    torch.set_num_threads(threads)


def hub_options(function: F) -> F:
    """``--revision REV`` and ``--token TOKEN`` (passed as ``revision`` and ``token``) for models
    on the Hugging Face hub; the token is also read from ``$HF_TOKEN``."""
    function = click.option("--token", default=None, envvar="HF_TOKEN", show_envvar=True,
                            help="Hugging Face token for private or gated hub models")(function)
    return click.option("--revision", default=None,
                        help="hub branch, tag or commit of MODEL (same as MODEL@REV)")(function)


def use_hub_token(token: str | None) -> None:
    """Make ``token`` the one huggingface_hub sends (it reads ``$HF_TOKEN`` at each request)."""
    import os

    if token:
        os.environ["HF_TOKEN"] = token


def check_revision(model: str, revision: str | None) -> None:
    """A UsageError when ``--revision`` is given for a model that is not on the hub."""
    if revision is None:
        return
    from shoal.eval.loading import locate_model

    if locate_model(model).path is not None:
        raise click.UsageError(f"--revision applies to hub models; {model} is a local model")
