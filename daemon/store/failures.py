"""Why a run failed, in one line: a training child's reason for its daemon, and the machine's faults.

A child that fails on something other than its file's content (which it records in
the ledger itself) used to leave the daemon only its exit code; the cause was a
traceback on stderr. Now the child writes the cause, ``<ExceptionType>: <first line
of its message>``, into a small JSON file that the daemon names in its environment
(:data:`FAILURE_FILE_ENV`, ``<status_dir>/.training-failure.json``), atomically, just
before it exits non-zero; the daemon removes the file before each attempt and reads it
after (:meth:`daemon.service.supervisor.ProcessSupervisor.run`).

A file rather than the last line of the child's stderr:

- the child holds the exception object, so nothing parses log text, whose last line may
  be a log record, a warning, or, under ``torchrun``, the launcher's own summary with the
  ranks' lines interleaved above it;
- the child's stderr stays the daemon's stream (its terminal or log file, where the
  traceback of a bug belongs), uncaptured: no pipe to pump, and a prestarted spare,
  started before any file was known, needs nothing else.

A fault of the machine (a folder read-only, not writable, full, or a file where a folder
belongs) is no bug of the product: :func:`fault_message` turns its ``OSError`` into one line
naming the path and what to do, which every entry point prints instead of a traceback.

Standard library and :mod:`daemon.store.status` only: the daemon process reads these too.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
from pathlib import Path

from daemon.exceptions import DaemonError, LedgerError
from daemon.store.files import atomic_write_text

logger = logging.getLogger(__name__)

# Set by the daemon for its training children: the file in which a failing child leaves its reason.
FAILURE_FILE_ENV = "CONTINUAL_FAILURE_FILE"
FAILURE_FILE = ".training-failure.json"
MAX_REASON_CHARS = 500


def describe(error: BaseException) -> str:
    """The reason shown to a user: a :class:`DaemonError`'s message, a fault of the machine's line
    (:func:`fault_message`), else ``Type: message``; first line only.

    Args:
        error: the exception that ended the run.

    Returns:
        One line of at most :data:`MAX_REASON_CHARS` characters.
    """
    if isinstance(error, OSError) and (fault := fault_message(error)) is not None:
        return fault
    lines = str(error).strip().splitlines()
    message = lines[0].strip() if lines else ""
    if not isinstance(error, DaemonError):
        message = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return message if len(message) <= MAX_REASON_CHARS else message[: MAX_REASON_CHARS - 3] + "..."


def leave_reason(error: BaseException) -> None:
    """Write why this training process fails into the file its daemon named (nothing when run by hand).

    The first reason of an attempt is kept: under a launcher the ranks share the file, and the rank
    that fails first is the cause; the others fail because of it (``Connection closed by peer`` from a
    collective), after it. The daemon removes the file before each attempt.

    Never raises: a reason that cannot be written (a read-only or full disk) is logged, and the
    daemon falls back on the exit code.

    Args:
        error: the exception that ends the process.
    """
    path = os.environ.get(FAILURE_FILE_ENV)
    if not path:
        return
    text = json.dumps({"reason": describe(error), "pid": os.getpid()}) + "\n"
    try:
        if not _write_first(Path(path), text):
            logger.debug("another process of this attempt left its reason first: %s kept", path)
    except OSError as e:
        logger.error("could not leave the failure's reason for the daemon in %s: %s", path, e)


def _write_first(path: Path, text: str) -> bool:
    """Write ``path`` whole unless it exists (a hard link of a finished temporary file); False when it did.

    Raises:
        OSError: the folder cannot be written.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as e:  # a file system without hard links: replace, as before
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        atomic_write_text(path, text)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def take_reason(path: Path) -> str | None:
    """Read and remove the reason a training child left in ``path``.

    Args:
        path: the daemon's failure file.

    Returns:
        The child's one-line reason, or None when it left none (or an unreadable one).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        logger.error("could not read the training process's failure reason in %s: %s", path, e)
        return None
    clear_reason(path)
    try:
        reason = json.loads(text)["reason"]
    except (ValueError, KeyError, TypeError):
        return None
    return reason if isinstance(reason, str) and reason else None


def clear_reason(path: Path) -> None:
    """Remove a reason left by an earlier attempt, so it is never taken for the next one's.

    Raises:
        OSError: it exists and cannot be removed (the status folder is not writable).
    """
    path.unlink(missing_ok=True)


# What to do about each fault of the machine, by errno; {path} is the path the system call named.
_FAULT_ADVICE = {
    errno.EROFS: "is on a read-only file system: remount it read-write, or point {flag} at a writable folder",
    errno.EACCES: "is not writable by this user: give it write access (chown, chmod) or point {flag} elsewhere",
    errno.ENOSPC: "is on a full disk: free space there (old checkpoints, the datasets cache), then start again",
    errno.EDQUOT: "is over its disk quota: free space there or raise the quota, then start again",
    errno.EIO: "could not be read or written (input/output error): the disk may be failing; check it (dmesg)",
    errno.ENOTDIR: "has a file where a folder belongs: move that file away, or point {flag} elsewhere",
    errno.EEXIST: "is a file where a folder belongs: move that file away, or point {flag} elsewhere",
}
_FAULT_ADVICE[errno.EPERM] = _FAULT_ADVICE[errno.EACCES]


ANY_FOLDER_FLAG = "the folder flag (--status_dir, --output_dir or --inbox_dir)"


def fault_message(error: OSError, flag: str = ANY_FOLDER_FLAG) -> str | None:
    """One line for a fault of the machine: the path, what happened and what to do.

    Args:
        error: an ``OSError`` that reached an entry point.
        flag: the flag that names the folder, where the caller knows it (``--status_dir``).

    Returns:
        The line (without ``error:``), or None when ``error`` is no fault of the machine (no
        path, another errno, or a path that exists as a folder for ``EEXIST``): a bug, whose
        traceback must show.
    """
    advice = _FAULT_ADVICE.get(error.errno or 0)
    if advice is None or error.filename is None:
        return None
    path = os.fsdecode(error.filename)
    if error.errno == errno.EEXIST and (os.path.isdir(path) or not os.path.lexists(path)):
        return None
    return f"{path} {advice.format(flag=flag)} ({error.strerror})"


LEDGER_BUSY_SECONDS = 30.0  # how long a ledger transaction waits for another process's
LEDGER_REBUILD = "python -m daemon rebuild-ledger"
# SQLite's messages for faults of the ledger's file or of the machine (the sqlite3 module of Python 3.11
# has sqlite_errorname, but not for every error raised at connect): what happened, what to do.
_LEDGER_FAULTS = (
    (
        ("file is not a database", "database disk image is malformed"),
        "is damaged ({error})",
        "with no daemon running, rebuild it from history.jsonl, the checkpoints and the inbox: "
        + LEDGER_REBUILD
        + " --status_dir {folder} (docs/operating.md 'A damaged ledger')",
    ),
    (
        ("database is locked", "database table is locked"),
        "stayed locked by another program for over {busy:.0f} s",
        "close whatever holds it open (a sqlite3 shell, a backup or sync tool), then start again",
    ),
    (
        ("readonly database", "unable to open database file"),
        "cannot be written ({error})",
        "make {folder} and the ledger writable by this user, or point --status_dir at a writable folder",
    ),
    (("database or disk is full",), "cannot grow ({error})", "free space on its disk, then start again"),
    (
        ("disk I/O error",),
        "could not be read or written ({error})",
        "the disk may be failing: check it (dmesg), copy the status folder to a sound disk and use the copy",
    ),
)


def ledger_fault(path: Path, error: sqlite3.Error) -> LedgerError | None:
    """The one-line :class:`LedgerError` for a fault of the ledger's file or of the machine.

    Args:
        path: the ledger file (``status/ledger.sqlite``).
        error: what ``sqlite3`` raised.

    Returns:
        The error to raise ``from error``, naming ``path`` and what to do; None when ``error``
        is none of those faults (a bug, which keeps its traceback).
    """
    text = str(error)
    for needles, what, todo in _LEDGER_FAULTS:
        if any(needle in text for needle in needles):
            fields = {"error": text, "folder": path.parent, "busy": LEDGER_BUSY_SECONDS}
            return LedgerError(f"{path} {what.format(**fields)}: {todo.format(**fields)}")
    return None
