"""Folder locks: a daemon locks its output folder, status folder and inbox (:func:`lock_folders`).

A training run locks its output and status folders the same way
(:func:`daemon.training.claims.owning`), so ``train.py`` never runs beside a daemon or another
``train.py`` on them. Locks are ``flock``s the kernel drops when their holder dies.

Standard library and ``filelock``: the daemon process uses it without torch.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import Protocol

from filelock import FileLock, Timeout

from daemon.exceptions import FolderBusy, MachineFault
from daemon.store.failures import fault_message

logger = logging.getLogger(__name__)

LOCK_FILE = ".daemon.lock"
# Who else holds a busy folder's lock, by the folder's role; the output folder's message is docs/guarantees.md's.
_BUSY = {
    "inbox": "another daemon is already watching the inbox {folder} (the folder is locked)",
    "status": "another daemon is already reporting into {folder}, or a train.py is ({lock} is locked)",
    "output": "another daemon is already training {folder}, or a train.py is ({lock} is locked)",
}


class FolderLock(Protocol):
    """A held folder lock: a ``filelock.FileLock`` or a flock on the folder itself."""

    def release(self) -> None:
        """Give the lock back."""
        ...


class _DirectoryFlock:
    """A ``flock`` on a folder itself, which adds nothing to it: for the inbox, which holds only the user's files.

    Raises:
        BlockingIOError: another process holds it.
        OSError: the filesystem cannot lock a folder (some network filesystems).
    """

    def __init__(self, folder: Path) -> None:
        self._fd: int | None = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(self._fd)
            raise

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor of the open file drops its flock
            self._fd = None


class _Unlocked:
    """Stands for an inbox lock the filesystem could not take."""

    def release(self) -> None:
        pass


def _take(role: str, folder: Path) -> FolderLock | None:
    """The lock of one folder, or None when another process holds it."""
    if role == "inbox":
        try:
            return _DirectoryFlock(folder)
        except BlockingIOError:
            return None
        except OSError as e:  # not worth refusing to start: the inbox had no lock before
            logger.warning("cannot lock the inbox %s on this filesystem (%s): run one daemon per inbox", folder, e)
            return _Unlocked()
    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def _take_usable(role: str, folder: Path) -> FolderLock | None:
    """:func:`_take` on ``folder``, made first if missing; a fault of the machine becomes one line.

    Raises:
        MachineFault: the folder cannot be made or its lock file created.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return _take(role, folder)
    except OSError as e:
        fault = fault_message(e, f"--{role}_dir")
        if fault is None:
            raise
        raise MachineFault(f"cannot use the {role} folder {folder}: {fault}") from e


def lock_folders(folders: list[tuple[str, str]], *, trust_supervisor: bool = False) -> list[FolderLock]:
    """Lock each folder without waiting: ``<folder>/.daemon.lock`` (``filelock``), the inbox folder itself.

    The inbox gets a ``flock`` on the folder, so that nothing but the user's files is ever in it.

    Args:
        folders: ``(role, folder)`` pairs; role ``inbox``, ``status`` or ``output`` (names the
            folder in the error). Missing folders are created; a folder named twice is locked once.
        trust_supervisor: this is a daemon's training child: a folder whose lock is held is
            taken to be held by that daemon (which never lets two children run), not refused.

    Returns:
        The locks taken; pass them to :func:`release_folders`.

    Raises:
        FolderBusy: one line naming the first folder another process holds (nothing is held then).
        MachineFault: a folder cannot be made or locked: read-only, not writable, a file, a full
            disk (one line naming it and what to do; nothing is held then).
    """
    locks: list[FolderLock] = []
    seen: set[Path] = set()
    try:
        for role, name in folders:
            folder = Path(name)
            if folder.resolve() in seen:
                continue
            seen.add(folder.resolve())
            lock = _take_usable(role, folder)
            if lock is not None:
                locks.append(lock)
            elif trust_supervisor:
                logger.debug("%s is locked by the daemon that started this process", folder)
            else:
                raise FolderBusy(_BUSY[role].format(folder=folder, lock=folder / LOCK_FILE))
    except BaseException:
        release_folders(locks)
        raise
    return locks


def release_folders(locks: list[FolderLock]) -> None:
    """Release the locks of :func:`lock_folders` (the kernel also does when the process ends)."""
    for lock in reversed(locks):
        lock.release()
