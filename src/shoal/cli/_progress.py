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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
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
