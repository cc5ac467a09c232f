"""Progress for library callbacks, and stdout that keeps tables whole.

On a terminal each stage gets a labelled bar on stderr; when stderr is a file or a pipe
(``shoal demo > log 2>&1``, a CI job) each stage writes one line when it starts and one when
it ends, with its elapsed time, instead of redrawing bars nobody sees.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

import click
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from shoal.progress import ProgressFn

console = Console(stderr=True)
# soft wrap: a Markdown table printed to a file or a pipe is not cut or wrapped at 80 columns;
# no markup: "[...]" in a cell is text
stdout = Console(soft_wrap=True, markup=False, highlight=False, emoji=False)


def print_text(text: str) -> None:
    """Print preformatted text (Markdown tables) to stdout exactly as given, never wrapped."""
    click.echo(text.rstrip("\n"))


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[ProgressFn]:
    """Yield a progress callback: labelled bars on a terminal, stage lines elsewhere, or nothing.

    transformers' own bars (loading and writing weights, once per candidate in a search) are
    switched off: shoal's progress says what is happening."""
    _no_transformers_bars()
    if not enabled:
        yield lambda stage, done, total: None
    elif console.is_terminal:
        with _bars() as report:
            yield report
    else:
        lines = StageLines(lambda line: click.echo(line, err=True))
        try:
            yield lines
        finally:
            lines.close()


@contextmanager
def _bars() -> Iterator[ProgressFn]:
    bars: dict[str, TaskID] = {}
    last: dict[str, int] = {}
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
            if stage not in bars or done < last[stage]:  # a stage that starts again gets a new bar
                bars[stage] = progress.add_task(stage, total=total)
            last[stage] = done
            progress.update(bars[stage], completed=done, total=total)

        yield report


class StageLines:
    """A progress callback that writes one line when a stage starts and one when it ends.

    A stage ends when ``done`` reaches ``total``; one that reports again from a lower count
    afterwards starts again. Stages still open at :meth:`close` (no total, or stopped early)
    end there."""

    def __init__(self, write: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self._write = write
        self._clock = clock
        self._open: dict[str, tuple[float, int, int | None]] = {}  # stage -> (start, done, total)
        self._finished: dict[str, int] = {}  # stage -> its final count

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        now = self._clock()
        if stage not in self._open:
            if stage in self._finished and done >= self._finished[stage]:
                return  # a repeated final report of a finished stage
            self._finished.pop(stage, None)
            self._open[stage] = (now, done, total)
            self._write(f"{_clock_time()} {stage}: started" + (f" ({total} steps)" if total else ""))
        start = self._open[stage][0]
        self._open[stage] = (start, done, total)
        if total is not None and done >= total:
            self._end(stage, now)

    def _end(self, stage: str, now: float) -> None:
        start, done, total = self._open.pop(stage)
        count = f"{done}/{total}" if total is not None else f"{done}"
        verb = "done" if total is None or done >= total else "stopped at"
        self._write(f"{_clock_time()} {stage}: {verb} {count} in {_seconds(now - start)}")
        self._finished[stage] = done

    def close(self) -> None:
        now = self._clock()
        for stage in list(self._open):
            self._end(stage, now)


def _clock_time() -> str:
    return time.strftime("%H:%M:%S")


def _seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


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
