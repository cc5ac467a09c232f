"""Rich progress bars for library progress callbacks."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from shoal.progress import ProgressFn

console = Console(stderr=True)
stdout = Console()


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[ProgressFn]:
    """Yield a progress callback that draws one bar per stage on stderr.

    transformers' own bars (loading and writing weights, once per candidate in a search) are
    switched off: shoal's bars say what is happening."""
    _no_transformers_bars()
    if not enabled:
        yield lambda stage, done, total: None
        return
    bars: dict[str, TaskID] = {}
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as progress:

        def report(stage: str, done: int, total: int | None) -> None:
            if stage not in bars:
                bars[stage] = progress.add_task(stage, total=total)
            progress.update(bars[stage], completed=done, total=total)

        yield report


def _no_transformers_bars() -> None:
    """Switch off transformers' and huggingface_hub's progress bars without importing transformers.

    transformers takes its setting from huggingface_hub's when it is imported (importing it
    here would cost a command that never uses it, ``shoal merge``, half a second).
    """
    import sys

    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    if "transformers.utils.logging" in sys.modules:  # already imported: tell it too
        sys.modules["transformers.utils.logging"].disable_progress_bar()


def quiet_optuna() -> None:
    """Optuna's per-trial INFO lines off (warnings stay): the progress bars say how a search goes.
    The library leaves Optuna's log level alone; a command that runs a search sets it here."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
