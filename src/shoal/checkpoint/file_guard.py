"""Knowing when a weight file changes under a reader: file identities and read leases.

A file's identity (device, inode, size, mtime) changes when it is replaced by a rename or
rewritten in place. A read lease (Linux ``F_SETLEASE``) goes further for memory-mapped reads:
a process that opens the file for writing or truncates it must wait until the lease is given
up (at most ``/proc/sys/fs/lease-break-time`` seconds), so pages a reader has mapped cannot
vanish under it (which would kill it with SIGBUS); the reader sees the pending break with
:func:`lease_held` and stops.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no leases, ranges are copied
    fcntl = None  # type: ignore[assignment]

from shoal.errors import CheckpointError

Identity = tuple[int, int, int, int]

_F_SETSIG = getattr(fcntl, "F_SETSIG", 10 if hasattr(fcntl, "F_SETLEASE") else None)  # Linux: 10


def file_identity(stat: os.stat_result) -> Identity:
    """(device, inode, size, mtime_ns): what changes when a file is replaced or rewritten."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def path_identity(path: Path) -> Identity:
    return file_identity(os.stat(path))


def fd_identity(fd: int) -> Identity:
    return file_identity(os.fstat(fd))


def changed_error(path: Path, then: Identity, now: Identity, when: str) -> CheckpointError:
    what = ("replaced by another file" if now[:2] != then[:2]
            else f"resized from {then[2]} to {now[2]} bytes" if now[2] != then[2] else "rewritten")
    return CheckpointError(f"{path}: the file was {what} {when}; a merge reads each source as it was "
                           "when opened: run it again once the file stays put")


def take_read_lease(fd: int) -> bool:
    """A read lease on ``fd`` (kept by its memory maps too), or False where none can be had.

    A lease break is signalled; SIGURG, which is ignored unless a program asks for it, stands in
    for the default SIGIO, which would end the process. Readers poll :func:`lease_held` instead.
    """
    if _F_SETSIG is None or not hasattr(fcntl, "F_SETLEASE"):
        return False
    try:
        fcntl.fcntl(fd, _F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:  # EAGAIN: open for writing elsewhere; EACCES: not ours; EINVAL: no leases here
        return False
    return True


def lease_held(fd: int) -> bool:
    """Whether the read lease on ``fd`` stands (False once a writer or a truncation waits on it)."""
    return fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
