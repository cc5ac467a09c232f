"""One search per run folder at a time: an exclusive lock held for the whole run.

The lock is ``run.lock`` in the run folder, locked with ``flock`` and holding the holder's
process id. The kernel drops a ``flock`` when its process dies, however it dies (kill -9
included), so a lock left behind by a killed run is free to take: the next run takes it
over and says so. A second process asking while the first is alive is refused, naming the
holder, before it touches the study (its recovery of "interrupted" trials would otherwise
mark the live run's running trials failed).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from shoal.errors import ConfigError

LOCK_FILE = "run.lock"

log = logging.getLogger(__name__)


def _holder(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def acquire_run_lock(run_dir: Path) -> int:
    """Lock ``run_dir`` for this process; returns the lock's file descriptor.

    Raises ConfigError when a live process holds it. A lock file left by a process that is
    gone is taken over with a logged note."""
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise ConfigError(f"{run_dir} is in use: {who} is running this search; wait for it to "
                              "finish or stop it before resuming") from None
        # the holder we waited for may have removed the file on release; lock the file in place
        if _same_file(fd, path):
            break
        os.close(fd)
    previous = _holder(fd)
    if previous is not None and previous != os.getpid():
        log.warning("%s: took over the lock of process %d, which is no longer running", path, previous)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.fsync(fd)
    return fd


def release_run_lock(run_dir: Path, fd: int) -> None:
    """Remove the lock file and drop the lock (a cleanly finished run leaves no lock behind)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        if _same_file(fd, path):
            path.unlink()
    finally:
        os.close(fd)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock for the body of the ``with`` block."""
    fd = acquire_run_lock(run_dir)
    try:
        yield
    finally:
        release_run_lock(run_dir, fd)
