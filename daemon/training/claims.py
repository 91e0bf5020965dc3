"""What a training run owns while it runs: its output and status folders, and a claim on the Arrow cache.

- The folders are locked as a daemon locks them (:func:`daemon.store.locks.lock_folders`), or
  left to the daemon that supervises this run.
- Every training run holds a shared claim on the Arrow cache; one that finds no other run
  there first removes what killed runs left (:func:`dataset_cache_claim`).
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
from typing import TYPE_CHECKING

from daemon.config import SUPERVISOR_ENV
from daemon.exceptions import FolderBusy, MachineFault
from daemon.store.locks import FolderLock, lock_folders, release_folders

if TYPE_CHECKING:
    from daemon.training.arguments import Flags

logger = logging.getLogger(__name__)

CACHE_LOCK = ".continual-daemon.lock"
# The Arrow folders of this product's files in the datasets cache: load_records names them by its fingerprint
# "<shape>-<text_field>-<sha256>-rules<N>", under generator/ with "default-fingerprint=" (Dataset.from_generator).
# A killed run leaves "<version>.incomplete/" there (from_generator) or "<version>/tmpXXXXXXXX" (map, shuffle,
# train_test_split write a NamedTemporaryFile beside their cache file, renamed only when complete).
_PRODUCT_FOLDER = re.compile(r"default-fingerprint=.+-[0-9a-f]{64}-rules\d+")


@contextmanager
def owning(flags: Flags) -> Iterator[None]:
    """What a training run owns while it runs: its output and status folders, and a claim on the Arrow cache.

    Entered by :func:`daemon.training.run.train_file` before it writes anything.

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


@contextmanager
def owning_folders(output_dir: str, status_dir: str) -> Iterator[None]:
    """The output and status folders, owned as :func:`owning` owns them, before the run's flags are parsed.

    ``train.py`` finishes a kill's half-done work in them first (:func:`daemon.store.rollback.finish_interrupted_work`):
    its flags' defaults follow the checkpoints. Under a launcher only rank 0 (``RANK``) locks.

    Raises:
        FolderBusy: another daemon or ``train.py`` owns a folder.
        MachineFault: a folder cannot be made or locked (read-only, not writable, full).
    """
    locks: list[FolderLock] = []
    if os.environ.get("RANK", "0") == "0":
        supervised = bool(os.environ.get(SUPERVISOR_ENV))
        locks = lock_folders([("output", output_dir), ("status", status_dir)], trust_supervisor=supervised)
    try:
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
