"""Progress reporting: the library never prints, it calls a callback.

A progress callback receives the stage name, units done so far and the total (or None when
unknown). The CLI turns these calls into progress bars; library callers may pass any
function, or nothing.
"""

from __future__ import annotations

from typing import Callable, Optional

ProgressFn = Callable[[str, int, Optional[int]], None]


def no_progress(stage: str, done: int, total: int | None) -> None:
    """A progress callback that ignores every event."""
