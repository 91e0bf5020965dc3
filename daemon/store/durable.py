"""What the product can prove about a checkpoint on disk, and room for the next one (docs/guarantees.md "Guarantees").

**The commit marker.** The Trainer writes a ``checkpoint-<step>`` folder without fsync.
:func:`commit_checkpoint` then fsyncs every file, the folder and its parent, and only then
writes ``commit.json`` (the step and every file's size), atomically and fsynced: the marker
is written last, as ``torch.distributed.checkpoint`` writes its ``.metadata`` file last, so a
folder with a marker was whole on disk when it was written. :func:`commit_problem` checks a
marked folder against its marker before it is resumed (a file missing, or shorter or longer
than committed); the format checks of :mod:`daemon.store.checkpoints` run on top. A folder without a
marker (written before the marker existed, or a save cut between the Trainer's write and the
marker) is judged by the format checks alone.

**Room for the next save.** Before a checkpoint is saved the training run compares the free
space of the output folder (:func:`free_bytes`) with :func:`daemon.store.checkpoints.space_needed`:
the last checkpoint's size, plus the export's when an export follows
(:class:`daemon.training.callbacks.CheckpointCallback`). Out of space it raises
:class:`~daemon.exceptions.DiskFull` instead of starting a save that would tear;
:func:`disk_full_after` turns a save that failed for want of space (the check can race) into
the same error, once the partial folders it left are removed (:func:`unfinished_saves`).
The training process then exits with :data:`EXIT_NO_SPACE` and its daemon waits for the room
(:func:`wait_for_room`) before it runs the file again.

Standard library only: the daemon process uses it without torch.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from daemon.exceptions import DaemonError, DiskFull
from daemon.store.files import atomic_write_text
from daemon.store.records import RunState, utc_now
from daemon.store.status import StatusFile

logger = logging.getLogger(__name__)

COMMIT_FILE = "commit.json"
# The training process's exit code for DiskFull (daemon.training.cli): its daemon waits for room, then runs the
# file again.
EXIT_NO_SPACE = 4
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# How a library reports ENOSPC when it does not raise an OSError with its errno (safetensors, a Rust error).
_NO_SPACE_TEXT = ("no space left on device", "os error 28", "disk quota exceeded")


def make_durable(folder: str | Path) -> None:
    """fsync every file of ``folder``, the folder and its parent, so a power loss keeps what was saved.

    Raises:
        OSError: a file or folder cannot be opened or synced.
    """
    root = Path(folder)
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for directory in (*sorted({p.parent for p in root.rglob("*")}), root, root.parent):
        fsync_dir(directory)


def fsync_dir(path: Path) -> None:
    """fsync a folder: its entries (files created, renamed or deleted in it) survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sizes(folder: Path) -> dict[str, int]:
    """``{relative path: bytes}`` of the files under ``folder``, the marker excluded."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.name != COMMIT_FILE
    }


def commit_checkpoint(folder: str | Path, global_step: int) -> None:
    """Make a saved checkpoint durable, then write its commit marker last (``commit.json``, fsynced).

    Args:
        folder: the ``checkpoint-<global_step>`` folder the Trainer has just written.
        global_step: the step it holds.

    Raises:
        OSError: a file cannot be synced or the marker cannot be written (ENOSPC included);
            the folder then has no marker.
    """
    root = Path(folder)
    make_durable(root)
    marker = {"global_step": global_step, "files": _sizes(root), "committed_at": utc_now()}
    atomic_write_text(root / COMMIT_FILE, json.dumps(marker, indent=1) + "\n")
    fsync_dir(root)


def commit_problem(folder: Path) -> str | None:
    """None when every file of ``folder``'s commit marker is there with its committed size, else what differs.

    A folder without a marker has nothing to compare: None.
    """
    path = folder / COMMIT_FILE
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        committed = {str(name): int(size) for name, size in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable {COMMIT_FILE} ({type(e).__name__})"
    for name, size in committed.items():
        try:
            actual = (folder / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing ({COMMIT_FILE} lists it)"
        if actual != size:
            return f"{name} is {actual} bytes, {size} when committed (truncated or changed)"
    return None


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it is missing)."""
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def free_bytes(folder: str | Path) -> int:
    """Bytes free for this process on ``folder``'s filesystem (``shutil.disk_usage``)."""
    return shutil.disk_usage(folder).free


def unfinished_saves(output_dir: str | Path, complete: list[int]) -> list[Path]:
    """The partial folders a failed save leaves: ``checkpoint-<n>`` above the newest complete one, the export's stage.

    Asked by the run whose save failed, holding the output folder: every incomplete checkpoint
    older than its start was set aside as ``torn-checkpoint-*`` before its first step, so what is
    above the newest complete checkpoint now is its own, and it holds space the next save needs.

    Args:
        output_dir: the running model's folder.
        complete: the steps of the complete checkpoints (:func:`daemon.store.checkpoints.complete_checkpoint_steps`).
    """
    root = Path(output_dir)
    newest = max(complete, default=-1)
    partial = [p for p in root.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and int(m[1]) > newest]
    return partial + [p for p in (root / ".export.staged",) if p.exists()]


def remove_unfinished_saves(folders: list[Path]) -> None:
    """Delete the folders of :func:`unfinished_saves`, with a log line each, then fsync their parent."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        logger.warning("removed %s, left by a save that ran out of space", folder.name)
    if folders:
        fsync_dir(folders[0].parent)


def is_no_space(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it was raised from or during) is the filesystem being full.

    ENOSPC or EDQUOT as an ``OSError``'s errno, or their text in a message (safetensors raises
    its own error type with the OS error's text).
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(current).lower() for text in _NO_SPACE_TEXT):
            return True
        current = current.__cause__ or current.__context__
    return False


@contextmanager
def disk_full_after(
    output_dir: str | Path, needed: Callable[[], int], complete: Callable[[], list[int]], what: str
) -> Iterator[None]:
    """Turn a save that fails for want of space into :class:`DiskFull`, after removing what it left.

    A save fails for want of space when its error says so (:func:`is_no_space`), or when, its
    partial folders counted as free, fewer bytes are free than the save needs: ``torch.save``
    reports a full disk only as a failed write of its archive. Any other error passes unchanged,
    and the partial folders stay (they are set aside as torn by the next run).

    Args:
        output_dir: the running model's folder.
        needed: ``() -> int``, the bytes the save needs (asked on a failure only).
        complete: ``() -> list[int]``, the steps of the complete checkpoints.
        what: what was being written, for the message.

    Raises:
        DiskFull: from the save's error.
    """
    try:
        yield
    except DaemonError:
        raise  # a failure of its own (DiskFull from the check before the save included), not a write's
    except Exception as e:
        steps = complete()
        partial = unfinished_saves(output_dir, steps)
        bytes_needed = needed()
        reclaimable = free_bytes(output_dir) + sum(folder_bytes(p) for p in partial)
        if not is_no_space(e) and reclaimable >= bytes_needed:
            raise
        remove_unfinished_saves(partial)
        raise DiskFull(output_dir, bytes_needed, free_bytes(output_dir), what, max(steps, default=None)) from e


def wait_for_room(
    status: StatusFile, folder: str | Path, needed: int, stop: threading.Event, poll: float, on_poll: Callable[[], None]
) -> bool:
    """Wait, state ``waiting_for_disk``, until ``folder``'s filesystem has ``needed`` bytes free or ``stop`` is set.

    One log line when the wait starts and one when it ends; the status's ``disk`` shows
    ``{path, needed_bytes, free_bytes}`` meanwhile and is cleared (state ``idle``) once there is room.

    Args:
        status: the daemon's status file.
        folder: the output folder.
        needed: bytes the next save needs.
        stop: the daemon's stop request.
        poll: seconds between two looks at the free space.
        on_poll: called at each look (the daemon publishes its queue).

    Returns:
        Whether there is room now (False: stopped first).
    """
    free = free_bytes(folder)
    logger.error(
        "no space left in %s: %s bytes needed for the next save, %s free; waiting until that much is free, "
        "then the file resumes by itself",
        folder,
        f"{needed:,}",
        f"{free:,}",
    )
    disk = {"path": str(folder), "needed_bytes": needed, "free_bytes": free, "at": utc_now()}
    status.update(state=RunState.WAITING_FOR_DISK, disk=disk)
    while free < needed and not stop.wait(poll):
        free = free_bytes(folder)
        on_poll()
    if free < needed:
        return False
    logger.info("%s has %s bytes free: resuming", folder, f"{free:,}")
    status.update(state=RunState.IDLE, disk=None)
    return True
