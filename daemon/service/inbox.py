"""The drop zone: which entries count as files to train, claims, and filing results away.

``inbox/`` is where users drop JSONL files; the daemon (:mod:`daemon.service.watcher`)
decides when to take one. This module holds the folder rules of
docs/guarantees.md ("Lifecycle of a file"):

- Names starting with ``.`` or ending in ``.tmp`` / ``.part`` are being written
  and are ignored; entries that are not regular files (symlinks, FIFOs, sockets,
  devices, directories) or that have other hard links are never opened; a file
  still open for writing is not complete (:mod:`daemon.service.entries`).
- A file is claimed by an atomic rename into ``inbox/processing/`` and filed
  away into ``inbox/done/``, or ``inbox/failed/`` beside ``<name>.error.txt``
  (:class:`Inbox`); a taken name gets a ``-1``, ``-2``, ... suffix.

Whoever can write to ``inbox/`` can replace its subfolders, so none is trusted
by path: each is opened with ``O_NOFOLLOW`` right before use (a replacement is
moved aside into the drop zone and rejected there) and every operation is
relative to that descriptor, so a swap after the check cannot redirect it.
Derived names are shortened to fit (:func:`daemon.names.fit_name`); names are
escaped (:func:`daemon.names.printable`) wherever they are logged or written.

Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from daemon.names import fit_name, printable
from daemon.service.entries import is_ignored_name, open_for_writing, sha256_of
from daemon.store.records import utc_now

logger = logging.getLogger(__name__)

PROCESSING, DONE, FAILED = "processing", "done", "failed"
SUBDIRS = (PROCESSING, DONE, FAILED)
ERROR_SUFFIX = ".error.txt"
ASIDE_SUFFIX = ".not-a-folder"  # a planted subfolder replacement, moved aside into the drop zone
FIRST_RETRY_SECONDS, MAX_RETRY_SECONDS = 1.0, 300.0  # backoff of an entry that could not be moved
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass
class Candidate:
    """An entry in the drop zone, in arrival order (``seq``), with the mtime at its last close or rename event."""

    path: Path
    seq: int
    closed_mtime: float | None = None
    renamed_mtime: float | None = None


@dataclass
class _Held:
    ino: int  # the entry's identity: another one under the same name is not held
    due: float  # time.monotonic() of the next try
    delay: float


class _Backoff:
    """Entries that could not be moved, each left alone for a delay that doubles per failure (thread-safe)."""

    def __init__(self) -> None:
        self._held: dict[Path, _Held] = {}
        self._lock = threading.Lock()

    def hold(self, path: Path, ino: int) -> float:
        """Hold ``path`` back after a failed move; returns the seconds it is left alone."""
        with self._lock:
            old = self._held.get(path)
            delay = min(old.delay * 2, MAX_RETRY_SECONDS) if old and old.ino == ino else FIRST_RETRY_SECONDS
            self._held[path] = _Held(ino, time.monotonic() + delay, delay)
        return delay

    def release(self, path: Path) -> None:
        with self._lock:
            self._held.pop(path, None)

    def is_held(self, path: Path, st: os.stat_result) -> bool:
        with self._lock:
            held = self._held.get(path)
            return held is not None and held.ino == st.st_ino and time.monotonic() < held.due

    def forget_gone(self, folder: Path, inodes: dict[Path, int]) -> None:
        """Forget the entries of ``folder`` no longer there (``inodes``: path -> inode of what is there)."""
        with self._lock:
            for path, held in list(self._held.items()):
                if path.parent == folder and inodes.get(path) != held.ino:
                    del self._held[path]

    def next_in(self) -> float | None:
        """Seconds until the next held entry is due, or None when none is waiting."""
        now = time.monotonic()
        with self._lock:
            due = [held.due for held in self._held.values() if held.due > now]
        return min(due) - now if due else None


class Inbox:
    """The drop zone and its ``processing/``, ``done/`` and ``failed/`` folders.

    Thread-safe: the watchdog thread notes close events while the daemon loop scans.
    An entry that cannot be moved (:meth:`claim`, :meth:`finish`) is left out of
    :meth:`scan` and :meth:`claimed` for a while (1 s, doubling up to 5 min): the
    daemon neither spins on it nor is blocked by it.

    Args:
        root: the inbox folder (created with its subfolders).
        settle_seconds: how long size and mtime must stay unchanged before a file
            counts as completely written (a quarter of it after a close event).
    """

    def __init__(self, root: str | Path, settle_seconds: float) -> None:
        self.root = Path(root)
        self.settle_seconds = settle_seconds
        self.root.mkdir(parents=True, exist_ok=True)
        self._seq = itertools.count()
        self._known: dict[str, Candidate] = {}
        self._held = _Backoff()
        self._lock = threading.Lock()
        with _folders(self.root, *SUBDIRS):  # made, or checked, now
            pass

    def note_closed(self, path: Path) -> None:
        """Record a close-after-write event for ``path`` (a file in the drop zone)."""
        self._note(path, "closed_mtime")

    def note_renamed(self, path: Path) -> None:
        """Record that ``path`` was renamed into the drop zone: its writer says it is finished (SPEC section 9)."""
        self._note(path, "renamed_mtime")

    def _note(self, path: Path, event: str) -> None:
        try:
            mtime = path.lstat().st_mtime
        except OSError:
            return
        with self._lock:
            cand = self._known.get(path.name)
            if cand is None:
                cand = self._known[path.name] = Candidate(path, next(self._seq))
            setattr(cand, event, mtime)

    def scan(self) -> list[Candidate]:
        """Every entry now in the drop zone (but our subfolders, ignored names and held entries), in arrival order.

        Entries first seen in the same scan are ordered by mtime, then name. The
        subfolders are checked first: one that is not a real directory is moved
        aside under a name of its own, so it shows here as an entry to reject.

        Returns:
            The candidates, first arrived first.
        """
        with _folders(self.root, *SUBDIRS):  # a planted replacement of one is moved aside now, and rejected below
            pass
        entries, inodes = [], {}
        with os.scandir(self.root) as it:
            for entry in it:
                if is_ignored_name(entry.name) or entry.name in SUBDIRS:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                inodes[self.root / entry.name] = st.st_ino
                if not self._held.is_held(self.root / entry.name, st):
                    entries.append((st.st_mtime, entry.name))
        self._held.forget_gone(self.root, inodes)
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
        """Whether the writer is done: renamed into the drop zone, or unchanged for the settle time (a
        quarter of it after a close); and, where Linux can tell (:func:`open_for_writing`), open for
        writing nowhere. A file changed after its rename or close waits the whole settle time.

        Args:
            cand: a candidate from :meth:`scan`.
            now: the current Unix time (default: ``time.time()``).
        """
        try:
            mtime = cand.path.lstat().st_mtime
        except OSError:
            return False
        quiet = (now if now is not None else time.time()) - mtime
        if cand.renamed_mtime == mtime:
            settle = 0.0
        elif cand.closed_mtime == mtime:
            settle = self.settle_seconds / 4
        else:
            settle = self.settle_seconds
        if quiet < settle:
            return False
        return not open_for_writing(cand.path)  # a writer that only paused has not finished

    def claim(self, cand: Candidate) -> Path:
        """Move the entry out of the drop zone into ``processing/`` (atomic rename).

        Returns:
            The entry's path in ``processing/``.

        Raises:
            OSError: the entry is gone or cannot be renamed (then it is held back for a while).
        """
        with _folders(self.root, None, PROCESSING) as (root, processing):
            target = _free_name(processing, cand.path.name)
            self._move(cand.path, root, processing, target)
        with self._lock:
            self._known.pop(cand.path.name, None)
        return self.root / PROCESSING / target

    def claimed(self) -> list[Path]:
        """Entries in ``processing/`` (but held ones): claimed before a stop or a crash, oldest first."""
        entries, inodes = [], {}
        with _folders(self.root, PROCESSING) as (processing,), os.scandir(processing) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                path = self.root / PROCESSING / entry.name
                inodes[path] = st.st_ino
                if not self._held.is_held(path, st):
                    entries.append((st.st_ctime, entry.name, path))
        self._held.forget_gone(self.root / PROCESSING, inodes)
        return [path for _, _, path in sorted(entries)]

    def sha256(self, entry: Path) -> tuple[str, int]:
        """:func:`sha256_of` a claimed entry, opened inside the verified ``processing/``.

        Raises:
            OSError: as :func:`sha256_of`; FileNotFoundError when the entry is gone.
        """
        with _folders(self.root, self._folder_of(entry)) as (folder,):
            return sha256_of(entry.name, dir_fd=folder)

    def finish(self, entry: Path, error: str | None) -> Path:
        """Move an entry to ``done/`` or, with an ``error``, to ``failed/`` beside ``<name>.error.txt``.

        An error file that cannot be written (a full disk) is logged and the entry is
        moved all the same.

        Args:
            entry: a claimed entry, or a rejected one still in the drop zone.
            error: why it failed, or None for a trained file.

        Returns:
            Where the entry now is.

        Raises:
            OSError: it could not be moved (then it is held back for a while; the
                error text may already be written).
        """
        folder = FAILED if error is not None else DONE
        with _folders(self.root, self._folder_of(entry), folder) as (source, target_folder):
            target = _free_name(target_folder, entry.name)
            if error is not None:  # the reason first: a crash between the two leaves the file where it was
                _write_reason(target_folder, target, error)
            self._move(entry, source, target_folder, target)
        with self._lock:
            self._known.pop(entry.name, None)
        self._held.release(entry)
        return self.root / folder / target

    def next_retry_in(self) -> float | None:
        """Seconds until the next entry held back after a failed move is due again, or None."""
        return self._held.next_in()

    def _folder_of(self, entry: Path) -> str | None:
        if entry.parent == self.root:
            return None
        if entry.parent == self.root / PROCESSING:
            return PROCESSING
        raise ValueError(f"{entry} is neither in {self.root} nor in its {PROCESSING}/")

    def _move(self, entry: Path, source: int, folder: int, target: str) -> None:
        """Rename ``entry`` (in ``source``) to ``target`` in ``folder``; on failure hold it back, then raise."""
        try:
            os.rename(entry.name, target, src_dir_fd=source, dst_dir_fd=folder)
        except FileNotFoundError:
            raise
        except OSError as e:
            try:
                delay = self._held.hold(entry, os.lstat(entry.name, dir_fd=source).st_ino)
            except OSError:
                raise e from None
            logger.error("could not move %s: %s; leaving it for %.0f s", printable(str(entry)), e, delay)
            raise


@contextlib.contextmanager
def _folders(root: Path, *subs: str | None) -> Iterator[list[int]]:
    """Descriptors of ``root`` (for ``None``) or of its verified subfolders ``subs``, closed on exit."""
    fds: list[int] = []
    try:
        for sub in subs:
            fds.append(_open_folder(root, sub))
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def _open_folder(root: Path, sub: str | None) -> int:
    """A descriptor of ``root``, or of its subfolder ``sub`` once that is a real directory (made if missing).

    Raises:
        OSError: the folder cannot be made, or keeps being replaced.
    """
    root_fd = os.open(root, _DIR_FLAGS)
    if sub is None:
        return root_fd
    try:
        for _ in range(3):
            try:
                return os.open(sub, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=root_fd)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(sub, dir_fd=root_fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                _set_aside(root_fd, sub)
        raise OSError(errno.EAGAIN, f"{root / sub} keeps being replaced by something that is not a folder")
    finally:
        os.close(root_fd)


def _exists(folder: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=folder)
    except FileNotFoundError:
        return False
    return True


def _free_name(folder: int, name: str) -> str:
    """``name``, or ``stem-1.ext``, ``stem-2.ext``, ... (shortened to fit) if taken in ``folder``."""
    if not _exists(folder, name):
        return name
    path = Path(name)
    for n in itertools.count(1):
        alt = fit_name(f"{path.stem}-{n}", path.suffix)
        if not _exists(folder, alt):
            return alt
    raise AssertionError("unreachable")


def _write_reason(folder: int, target: str, error: str) -> None:
    """Write ``<target>.error.txt`` in ``folder``; a failure (a full disk) is logged, not raised.

    Written to a fresh temporary file (``O_EXCL | O_NOFOLLOW``) and renamed over the
    error file's name: whatever was planted there is replaced, never written through.
    """
    text = f"{printable(target)} failed at {utc_now()}:\n{printable(error)}\n"
    tmp = f".error-{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.rename(tmp, fit_name(target, ERROR_SUFFIX), src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=folder)
            raise
    except OSError as e:
        logger.error("could not write the reason why %s failed (%s); filing it without one", printable(target), e)


def _set_aside(root: int, sub: str) -> None:
    """Move a planted ``sub`` (a symlink or a file, never followed) aside into the drop zone, where it is rejected."""
    try:
        kind = "a symbolic link" if stat.S_ISLNK(os.lstat(sub, dir_fd=root).st_mode) else "not a directory"
        aside = _free_name(root, sub + ASIDE_SUFFIX)
        os.rename(sub, aside, src_dir_fd=root, dst_dir_fd=root)
    except FileNotFoundError:
        return
    logger.error(
        "inbox/%s was %s, not our folder: moved it aside as %s, unfollowed; making a new one", sub, kind, aside
    )
