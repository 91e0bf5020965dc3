"""The drop zone: which entries count as files to train, claims, and filing results away.

``inbox/`` is where users drop JSONL files; the daemon (:mod:`daemon.watcher`)
decides when to take one. This module holds the folder rules of README
"Operating the daemon" ("Lifecycle of a file"):

- Names starting with ``.`` or ending in ``.tmp`` / ``.part`` are being written
  and are ignored (:func:`is_ignored_name`).
- Entries that are not regular files (symlinks, FIFOs, sockets, devices,
  directories) or that have other hard links are never opened
  (:func:`rejection_reason`, :func:`sha256_of`).
- A file is claimed by an atomic rename into ``inbox/processing/`` and filed
  away into ``inbox/done/``, or ``inbox/failed/`` beside ``<name>.error.txt``
  (:class:`Inbox`); a taken name gets a ``-1``, ``-2``, ... suffix.

Standard library only.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.records import utc_now

PROCESSING, DONE, FAILED = "processing", "done", "failed"
SUBDIRS = (PROCESSING, DONE, FAILED)
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


def sha256_of(path: Path) -> tuple[str, int]:
    """Hash a claimed file without following links or blocking on a FIFO.

    Args:
        path: the claimed entry.

    Returns:
        ``(hex digest, size in bytes)``.

    Raises:
        OSError: the entry is not a regular file (checked on the open descriptor).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        reason = rejection_reason(st)
        if reason:
            raise OSError(reason)
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest(), st.st_size


@dataclass
class Candidate:
    """An entry in the drop zone, in arrival order (``seq``), with its last close event if any."""

    path: Path
    seq: int
    closed_mtime: float | None = None


class Inbox:
    """The drop zone and its ``processing/``, ``done/`` and ``failed/`` folders.

    Thread-safe: the watchdog thread notes close events while the daemon loop scans.

    Args:
        root: the inbox folder (created with its subfolders).
        settle_seconds: how long size and mtime must stay unchanged before a file
            counts as completely written (a quarter of it after a close event).
    """

    def __init__(self, root: str | Path, settle_seconds: float) -> None:
        self.root = Path(root)
        self.settle_seconds = settle_seconds
        for sub in SUBDIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._seq = itertools.count()
        self._known: dict[str, Candidate] = {}
        self._lock = threading.Lock()

    def note_closed(self, path: Path) -> None:
        """Record a close-after-write event for ``path`` (a file in the drop zone)."""
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return
        with self._lock:
            cand = self._known.get(path.name)
            if cand is None:
                cand = self._known[path.name] = Candidate(path, next(self._seq))
            cand.closed_mtime = mtime

    def scan(self) -> list[Candidate]:
        """Every entry now in the drop zone (but our subfolders and ignored names), in arrival order.

        Entries first seen in the same scan are ordered by mtime, then name.

        Returns:
            The candidates, first arrived first.
        """
        entries = []
        for entry in os.scandir(self.root):
            if is_ignored_name(entry.name) or (entry.name in SUBDIRS and entry.is_dir(follow_symlinks=False)):
                continue
            try:
                entries.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
            except OSError:
                continue
        with self._lock:
            present = {name for _, name in entries}
            for name in list(self._known):
                if name not in present:
                    del self._known[name]
            for _, name in sorted(entries):
                if name not in self._known:
                    self._known[name] = Candidate(self.root / name, next(self._seq))
            return sorted(self._known.values(), key=lambda c: c.seq)

    def is_complete(self, cand: Candidate, now: float | None = None) -> bool:
        """Whether the writer is done: unchanged for the settle time (a quarter of it after a close).

        Args:
            cand: a candidate from :meth:`scan`.
            now: the current Unix time (default: ``time.time()``).
        """
        try:
            mtime = cand.path.stat().st_mtime
        except OSError:
            return False
        quiet = (now if now is not None else time.time()) - mtime
        closed = cand.closed_mtime is not None and cand.closed_mtime == mtime
        return quiet >= (self.settle_seconds / 4 if closed else self.settle_seconds)

    def claim(self, cand: Candidate) -> Path:
        """Move the entry out of the drop zone into ``processing/`` (atomic rename).

        Returns:
            The entry's path in ``processing/``.

        Raises:
            OSError: the entry is gone or cannot be renamed.
        """
        target = _free_name(self.root / PROCESSING / cand.path.name)
        os.rename(cand.path, target)
        with self._lock:
            self._known.pop(cand.path.name, None)
        return target

    def claimed(self) -> list[Path]:
        """Entries in ``processing/``: claimed before a stop or a crash, oldest first."""
        entries = [p for p in (self.root / PROCESSING).iterdir() if not p.name.startswith(".")]
        return sorted(entries, key=lambda p: (p.lstat().st_ctime, p.name))

    def finish(self, entry: Path, error: str | None) -> Path:
        """Move an entry to ``done/`` or, with an ``error``, to ``failed/`` beside ``<name>.error.txt``.

        Args:
            entry: a claimed entry, or a rejected one still in the drop zone.
            error: why it failed, or None for a trained file.

        Returns:
            Where the entry now is.

        Raises:
            OSError: it could not be moved (the error text may already be written).
        """
        folder = self.root / (FAILED if error is not None else DONE)
        target = _free_name(folder / entry.name)
        if error is not None:  # the reason first: a crash between the two leaves the file where it was
            text = f"{target.name} failed at {utc_now()}:\n{error}\n"
            (folder / f"{target.name}.error.txt").write_text(text, encoding="utf-8")
        os.rename(entry, target)
        with self._lock:
            self._known.pop(entry.name, None)
        return target


def _free_name(path: Path) -> Path:
    """``path``, or ``stem-1.ext``, ``stem-2.ext``, ... if taken."""
    if not os.path.lexists(path):
        return path
    for n in itertools.count(1):
        alt = path.with_name(f"{path.stem}-{n}{path.suffix}")
        if not os.path.lexists(alt):
            return alt
    raise AssertionError("unreachable")
