"""What one inbox entry is: a name being written, a hostile entry, a file still open, its hash.

Standard library only; used by :mod:`daemon.service.inbox` and the daemon loop.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
from pathlib import Path

IGNORED_SUFFIXES = (".tmp", ".part")


def is_ignored_name(name: str) -> bool:
    """True for names a writer uses while still writing: ``.*``, ``*.tmp``, ``*.part``."""
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)


def rejection_reason(st: os.stat_result) -> str | None:
    """Why an inbox entry must not be opened.

    Args:
        st: the entry's ``os.lstat`` (or ``os.fstat`` of an open descriptor).

    Returns:
        The reason shown to the user, or None for a plain regular file with one name.
    """
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "a symbolic link (only regular files are trained)"
    if stat.S_ISDIR(mode):
        return "a directory (only regular files are trained)"
    if stat.S_ISFIFO(mode):
        return "a FIFO (only regular files are trained)"
    if not stat.S_ISREG(mode):
        return "not a regular file (socket or device)"
    if st.st_nlink > 1:
        return f"a hard link ({st.st_nlink} names for one file; drop a copy instead)"
    return None


def sha256_of(path: str | Path, dir_fd: int | None = None) -> tuple[str, int]:
    """Hash a claimed file without following links or blocking on a FIFO.

    Args:
        path: the claimed entry (a name relative to ``dir_fd`` if given).
        dir_fd: a descriptor of the folder holding it, or None.

    Returns:
        ``(hex digest, size in bytes)``.

    Raises:
        OSError: the entry is not a regular file (checked on the open descriptor).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        reason = rejection_reason(st)
        if reason:
            raise OSError(reason)
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest(), st.st_size


def open_for_writing(path: Path) -> bool:
    """Whether a process holds ``path`` open for writing, as far as a Linux read lease can tell.

    A read lease (``fcntl(F_SETLEASE, F_RDLCK)``) is refused with EAGAIN while any process
    has the file open for writing (fcntl(2), "Leases"); it is released at once. Where
    leases are not available (another system, a filesystem without them, a file owned by
    another user without CAP_LEASE) the answer is False and the settle time alone decides.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)
