"""Files that readers never see half-written: the one atomic write, JSONL appender and JSONL reader.

Every status file, evaluation row, replay share, suite slice, marker and generated dataset of the
product is written through :func:`atomic_writer` (a new content lands whole, by ``os.replace``, or
not at all) or appended through :func:`append_json_lines`, and read back through
:func:`read_json_lines`, which skips a line a kill tore mid-append.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)


@contextmanager
def atomic_writer(path: Path) -> Iterator[IO[str]]:
    """A text file that replaces ``path`` when the block ends without an error, and vanishes otherwise.

    What is written goes to a temporary file in the same folder, is fsynced, then renamed over
    ``path`` (``os.replace`` is atomic on POSIX within one filesystem): readers see the old or
    the new content, never a mix. The file gets the mode a plain ``open`` would give it
    (``0o666`` less the umask): a service run with ``UMask=0077`` keeps its status private.

    Raises:
        OSError: the folder cannot be written; ``path`` is unchanged and no temporary file is left.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path``'s content with ``text`` (UTF-8) through :func:`atomic_writer`.

    Raises:
        OSError: the folder cannot be written; ``path`` is unchanged and no temporary file is left.
    """
    with atomic_writer(path) as f:
        f.write(text)


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new, exclusively created ``.<name>.<random>.tmp`` beside ``path``: ``(fd, its path)``.

    Not ``tempfile.mkstemp``, which forces mode 0600: ``os.open`` with 0o666 lets the
    kernel apply the umask, without reading or changing it (``os.umask`` is process-wide).
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def append_json_lines(path: Path, rows: list[dict[str, Any]], durable: bool = False) -> None:
    """Append ``rows`` to ``path``, one JSON line each; ``durable``: fsynced before returning.

    A torn last line (a process killed mid-append) gets its newline first, so it never glues
    onto the new rows: readers skip it alone.
    """
    lead = "" if _ends_with_newline(path) else "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(lead + "".join(json.dumps(row, sort_keys=False) + "\n" for row in rows))
        if durable:
            f.flush()
            os.fsync(f.fileno())


def _ends_with_newline(path: Path) -> bool:
    """True for a missing or empty file, or one whose last byte is a newline."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except FileNotFoundError:
        return True


def read_json_lines(path: Path, warn: bool = True) -> list[Any]:
    """Every JSON line of ``path`` in file order (empty when the file does not exist).

    Blank lines are skipped; so is a line that does not parse (torn by a kill in the middle
    of an append: its writer appends it whole again), with a warning naming it unless ``warn``
    is False.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if warn:
                logger.warning("%s line %d is torn or unreadable; skipped", path, number)
    return rows
