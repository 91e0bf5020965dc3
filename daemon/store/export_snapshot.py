"""One export, whole, for a reader that loads while new exports move in (``python -m daemon serve``).

An export moves in file by file (``os.replace``), ``export.json`` last
(:func:`daemon.store.checkpoints.export_model`): a reader listing the folder in the middle sees files
of two steps. Every install runs inside :func:`publishing`, which keeps the marker
``.export.publishing`` in the folder from before the first file moves until ``export.json`` names
the new step; an install that fails part-way leaves it there, as the folder then holds files of two
steps until the next install.

:func:`snapshot_export` hard-links the export's files into a folder of the reader's own. A link is
the file as it is at that moment and stays so: installing a newer export gives the name a new
inode, and the link keeps the old one (the product never writes an export's file in place). The
snapshot is accepted only when the folder was the same before and after linking: no marker, and
every file, ``export.json`` included, the same inode, size and modification time.
:func:`export_step` reads the step an export holds. Standard library only.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from daemon.store.durable import fsync_dir

EXPORT_STATE = "export.json"
PUBLISHING = ".export.publishing"
# A filesystem without hard links (some network and FUSE mounts): the files are copied instead.
_NO_HARD_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


@contextmanager
def publishing(root: Path) -> Iterator[None]:
    """Hold the marker :data:`PUBLISHING` in ``root`` while an install changes its export.

    The marker is removed (and the removal fsynced, so it does not come back after a power loss)
    only when the block ends without an exception.
    """
    marker = root / PUBLISHING
    marker.touch()
    yield
    marker.unlink(missing_ok=True)
    fsync_dir(root)


Signature = tuple[int, int, int, int]  # a file's device, inode, size and modification time (ns)


@dataclass(frozen=True)
class Snapshot:
    """An export linked whole (:func:`snapshot_export`): its step and its ``export.json``'s signature."""

    global_step: int
    signature: Signature


def export_signature(root: str | Path) -> Signature | None:
    """What changes whenever ``export.json`` is replaced (an atomic write: a new inode), or None without one.

    A stat, cheap enough to poll each second.
    """
    try:
        st = os.stat(Path(root) / EXPORT_STATE)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def export_step(output_dir: str | Path) -> int | None:
    """The ``global_step`` of the model exported at the root of ``output_dir`` (None if unknown).

    Unknown: no ``export.json``, or one that does not say a step (not the product's export).
    """
    try:
        return int(json.loads((Path(output_dir) / EXPORT_STATE).read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _files(root: Path) -> dict[str, Signature] | None:
    """The export's files at ``root``, by name: ``(device, inode, size, mtime_ns)``; None while it is not whole.

    Not whole: the marker is there, or ``config.json`` or ``export.json`` is missing. Hidden
    names (the stage, temporary files) and folders (checkpoints, ``adapter/``) are not the export's
    model files.
    """
    found = {}
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name == PUBLISHING:
                return None
            if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
            found[entry.name] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return found if {"config.json", EXPORT_STATE} <= found.keys() else None


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        shutil.copy2(source, target)


def snapshot_export(root: str | Path, dest: str | Path) -> Snapshot | None:
    """Hard-link the export of ``root`` into the new folder ``dest``: one step's files, which stay as they are.

    Args:
        root: the running model's folder (``--output_dir``).
        dest: a folder that does not exist yet, on the same filesystem as ``root`` for hard links
            (elsewhere the files are copied).

    Returns:
        The snapshot's ``global_step`` (its ``export.json``) and the signature ``export.json`` had
        (:func:`export_signature`), or None when there is no whole export now (none yet, one moving
        in, or one that moved in while linking): ``dest`` is then removed, and a later call may succeed.

    Raises:
        OSError: ``dest`` cannot be made or written (no space left, say); what was linked or
            copied into it is removed first, as on any other error.
    """
    root, dest = Path(root), Path(dest)
    before = _files(root)
    if before is None:
        return None
    dest.mkdir(parents=True)
    try:
        try:
            for name in before:
                _link_or_copy(root / name, dest / name)
        except FileNotFoundError:  # a file replaced or removed meanwhile
            step = None
        else:
            step = export_step(dest) if _files(root) == before else None
    except BaseException:  # a copy that ran out of space, an I/O error: no partial snapshot stays behind
        shutil.rmtree(dest, ignore_errors=True)
        raise
    if step is None:
        shutil.rmtree(dest, ignore_errors=True)
        return None
    return Snapshot(step, before[EXPORT_STATE])
