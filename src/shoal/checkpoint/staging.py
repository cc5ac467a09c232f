"""Build an output folder beside its destination and move it into place only when complete.

The staging folder is a hidden sibling of the destination, so the final move is a rename
on one filesystem. A merge that fails or is interrupted (exception, Ctrl-C) deletes the
staging folder and leaves the destination as it was. A process killed outright (SIGKILL,
power loss) can leave a hidden ``.NAME.staging-PID@HOST-*`` folder behind, but never a
half-written destination; the next run to the same destination removes such folders whose
process is gone (and logs a warning saying so).

A full disk while the output is built is a :class:`CheckpointError` naming the destination,
the space the output needs and the space that was free; nothing is left behind.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shoal.errors import CheckpointError

log = logging.getLogger(__name__)


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


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _staging_prefix(destination: Path, pid: int | None = None) -> str:
    return f".{destination.name}.staging-{os.getpid() if pid is None else pid}@{_host()}-"


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale_staging(destination: Path) -> list[Path]:
    """Delete the staging folders of earlier runs to ``destination`` whose process (on this host) is gone."""
    pattern = re.compile(re.escape(f".{destination.name}.staging-") + r"(\d+)@(.+)-[^-]+$")
    removed = []
    try:
        siblings = list(destination.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        match = pattern.match(path.name)
        if match is None or match.group(2) != _host() or not path.is_dir() or path.is_symlink():
            continue
        if _process_gone(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
    if removed:
        log.warning("removed %d staging folder%s of earlier merges to %s that were killed: %s",
                    len(removed), "s" if len(removed) > 1 else "", destination,
                    ", ".join(p.name for p in removed))
    return removed


def _make_parent(destination: Path) -> None:
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in [destination.parent, *destination.parent.parents]
                        if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise CheckpointError(f"{destination}: cannot create the output folder: {blocker} is a file, "
                                  "not a folder") from None
        raise CheckpointError(f"{destination}: cannot create the output folder's parent "
                              f"{destination.parent}: {exc.strerror or exc}") from None


def _human(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}" if unit != "B" else f"{count} B"
        size /= 1024
    return f"{size:.1f} TiB"


def _free_bytes(folder: Path) -> int | None:
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def _no_space(destination: Path, needed: int, free: int | None) -> CheckpointError:
    there = f"{_human(free)} free there" if free is not None else "free space unknown"
    return CheckpointError(f"{destination}: no space left on the device for the output "
                           f"(it needs at least {_human(needed)}; {there}); nothing was written")


def _disk_full(destination: Path, staging: Path, expected: int) -> CheckpointError:
    """The error for a full disk, measured after the partial output is gone: needed vs free.

    What the output needs is counted as the filesystem allocates it (whole blocks per file);
    shards have their full size from the moment they are created."""
    try:
        block = os.statvfs(staging).f_frsize or 4096
    except OSError:
        block = 4096
    needed = 0
    for root, _, files in os.walk(staging):
        for name in files:
            try:
                size = os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
            needed += max(1, -(-size // block)) * block
    shutil.rmtree(staging, ignore_errors=True)
    return _no_space(destination, max(needed, expected), _free_bytes(destination.parent))


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def staged_output(destination: Path, *, overwrite: bool = False, expected_bytes: int = 0) -> Iterator[Path]:
    """Yield a staging folder next to ``destination``; on success, rename it to ``destination``.

    Refuses (:class:`CheckpointError`) a non-empty existing destination unless
    ``overwrite``; with ``overwrite`` the old folder is replaced only after the new one is
    complete. On any exception, including ``KeyboardInterrupt``, the staging folder is
    deleted and the destination is untouched. Staging folders of killed earlier runs to the
    same destination are removed first (:func:`remove_stale_staging`). ``expected_bytes`` (what
    the output will hold, when known) is checked against the free space before anything is written.
    """
    destination = Path(destination).expanduser().absolute()
    _check_destination(destination, overwrite)
    _make_parent(destination)
    remove_stale_staging(destination)
    free = _free_bytes(destination.parent)
    if free is not None and expected_bytes > free:
        raise _no_space(destination, expected_bytes, free)
    try:
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(destination), dir=destination.parent))
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise CheckpointError(f"{destination}: no space left on the device for the output folder") from None
        raise CheckpointError(f"{destination}: cannot create the output folder in {destination.parent}: "
                              f"{exc.strerror or exc}") from None
    # mkdtemp makes the folder private (0700); the result should look like any new folder.
    staging.chmod(0o777 & ~_umask())
    try:
        yield staging
        _check_destination(destination, overwrite)  # it may have appeared meanwhile
        _move_into_place(staging, destination)
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise _disk_full(destination, staging, expected_bytes) from None
        shutil.rmtree(staging, ignore_errors=True)
        raise
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
