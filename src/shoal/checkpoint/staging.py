"""Build an output folder beside its destination and move it into place only when complete.

The staging folder is a hidden sibling of the destination, so the final move is a rename
on one filesystem. A merge that fails or is interrupted (exception, Ctrl-C) deletes the
staging folder and leaves the destination as it was. A process killed outright (SIGKILL,
power loss) can leave a hidden ``.NAME.staging-*`` folder behind, but never a half-written
destination.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shoal.errors import CheckpointError


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _check_destination(destination: Path, overwrite: bool) -> None:
    if not (destination.exists() or destination.is_symlink()):
        return
    if destination.is_symlink() or not destination.is_dir():
        raise CheckpointError(f"{destination}: output path exists and is not a folder")
    if not overwrite and not _is_empty_dir(destination):
        raise CheckpointError(
            f"{destination}: output folder exists and is not empty; choose a new folder or allow overwriting"
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_output(destination: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder next to ``destination``; on success, rename it to ``destination``.

    Refuses (:class:`CheckpointError`) a non-empty existing destination unless
    ``overwrite``; with ``overwrite`` the old folder is replaced only after the new one is
    complete. On any exception, including ``KeyboardInterrupt``, the staging folder is
    deleted and the destination is untouched.
    """
    destination = Path(destination).expanduser().absolute()
    _check_destination(destination, overwrite)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.staging-", dir=destination.parent))
    # mkdtemp makes the folder private (0700); the result should look like any new folder.
    staging.chmod(0o777 & ~_umask())
    try:
        yield staging
        _check_destination(destination, overwrite)  # it may have appeared meanwhile
        _move_into_place(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, destination: Path) -> None:
    if not destination.exists() or _is_empty_dir(destination):
        # rename(2) replaces an empty folder atomically.
        os.replace(staging, destination)
        return
    # Overwriting a non-empty folder: set the old one aside, move the new one in, then
    # delete the old one. If the move fails, put the old one back.
    retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
    os.replace(destination, retired / "previous")
    try:
        os.replace(staging, destination)
    except BaseException:
        os.replace(retired / "previous", destination)
        shutil.rmtree(retired, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)
