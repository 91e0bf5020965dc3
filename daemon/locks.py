"""Who owns what: folder locks, and a training run's claim on the Arrow cache.

- A daemon locks its output folder, status folder and inbox (:func:`lock_folders`); a
  training run locks its output and status folders (:func:`owning`), so ``train.py``
  never runs beside a daemon or another ``train.py`` on them. Locks are ``flock``s the
  kernel drops when their holder dies.
- Every training run holds a shared claim on the Arrow cache; one that finds no other
  run there first removes what killed runs left (:func:`dataset_cache_claim`).

Standard library and ``filelock`` at import: the daemon process uses it without torch.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from filelock import FileLock, Timeout

from daemon.config import SUPERVISOR_ENV
from daemon.exceptions import FolderBusy, MachineFault
from daemon.failures import fault_message

if TYPE_CHECKING:
    from daemon.arguments import Flags

logger = logging.getLogger(__name__)

LOCK_FILE = ".daemon.lock"
# Who else holds a busy folder's lock, by the folder's role; the output folder's message is docs/guarantees.md's.
_BUSY = {
    "inbox": "another daemon is already watching the inbox {folder} (the folder is locked)",
    "status": "another daemon is already reporting into {folder}, or a train.py is ({lock} is locked)",
    "output": "another daemon is already training {folder}, or a train.py is ({lock} is locked)",
}
CACHE_LOCK = ".continual-daemon.lock"
# The Arrow folders of this product's files in the datasets cache: load_records names them by its fingerprint
# "<shape>-<text_field>-<sha256>-rules<N>", under generator/ with "default-fingerprint=" (Dataset.from_generator).
# A killed run leaves "<version>.incomplete/" there (from_generator) or "<version>/tmpXXXXXXXX" (map, shuffle,
# train_test_split write a NamedTemporaryFile beside their cache file, renamed only when complete).
_PRODUCT_FOLDER = re.compile(r"default-fingerprint=.+-[0-9a-f]{64}-rules\d+")


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


@contextmanager
def owning(flags: Flags) -> Iterator[None]:
    """What a training run owns while it runs: its output and status folders, and a claim on the Arrow cache.

    Entered by :func:`daemon.run.train_file` before it writes anything.

    Args:
        flags: the run's flags.

    Raises:
        FolderBusy: another daemon or ``train.py`` owns a folder.
        MachineFault: a folder cannot be made or locked (read-only, not writable, full).
    """
    locks = claim_folders(flags, supervised=bool(os.environ.get(SUPERVISOR_ENV)))
    try:
        with dataset_cache_claim(flags.data.dataset_cache_dir):
            yield
    finally:
        release_folders(locks)


def claim_folders(flags: Flags, supervised: bool) -> list[FolderLock]:
    """Lock the run's output and status folders (``.daemon.lock``), as a daemon does, or refuse to run.

    Under ``torchrun`` rank 0 locks and every rank learns its answer, so all stop together.

    Args:
        flags: the run's flags (``--output_dir``, ``--status_dir``, the world).
        supervised: this is a daemon's training child: its daemon holds these locks for it.

    Returns:
        The locks this process holds (none on ranks other than 0, nor in a daemon's child).

    Raises:
        FolderBusy: another daemon or ``train.py`` owns a folder; nothing has been written.
        MachineFault: a folder cannot be made or locked (read-only, not writable, full).
    """
    folders = [("output", str(flags.training.output_dir)), ("status", flags.status.status_dir)]
    locks: list[FolderLock] = []
    error: FolderBusy | MachineFault | None = None
    if flags.training.process_index == 0:
        try:
            locks = lock_folders(folders, trust_supervisor=supervised)
        except (FolderBusy, MachineFault) as e:
            error = e
    if flags.training.world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            answer = [error]
            dist.broadcast_object_list(answer, src=0)
            error = answer[0]
    if error is not None:
        release_folders(locks)
        raise type(error)(str(error))
    return locks


@contextmanager
def dataset_cache_claim(cache_dir: str | None) -> Iterator[Path]:
    """Hold a shared ``flock`` on the Arrow cache while this run may write it; clean it first if no run holds one.

    Every training process of the product holds the shared lock from before its first
    cache write until it ends (the kernel drops it when the process is killed). One that
    finds the lock free (no other run of the product uses the cache) first takes it
    exclusively and removes the temporary files killed runs left in the product's folders
    (see :data:`_PRODUCT_FOLDER`), which no live process can be writing then.

    Args:
        cache_dir: ``--dataset_cache_dir``; None for the datasets cache.

    Yields:
        The cache folder.
    """
    import datasets

    root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / CACHE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another run uses the dataset cache %s: its temporary files are left to it", root)
        else:
            remove_cache_leftovers(root)
        fcntl.flock(fd, fcntl.LOCK_SH)  # exclusive -> shared, or wait for another run's cleaning to end
        yield root
    finally:
        os.close(fd)


def remove_cache_leftovers(root: Path) -> list[Path]:
    """Delete what killed runs left in the product's Arrow folders under ``root``; call only under the exclusive lock.

    Lock files (``*.lock``) stay: datasets keeps them after every run, and deleting a lock
    file another process may hold would break its lock.

    Returns:
        The paths removed.
    """
    removed = []
    folders = [f for f in root.glob("generator/default-fingerprint=*") if _PRODUCT_FOLDER.fullmatch(f.name)]
    for folder in folders:
        for path in [*folder.glob("*.incomplete"), *folder.glob("*/tmp????????")]:
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
    if removed:
        logger.info("removed %d temporary files killed runs left in %s", len(removed), root)
    return removed
