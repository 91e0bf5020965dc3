"""Names shown for, and derived from, the names of dropped files; counts in messages (standard library only).

A dropped file's name is chosen by whoever drops it: it may hold newlines,
control characters or bytes that are not UTF-8, and may be as long as the file
system allows. :func:`printable` is how such a name is shown (logs, error files,
the ledger); :func:`fit_name` shortens a name derived from it (``-1`` suffixes,
``.error.txt``, snapshot folders) to what the file system accepts.
"""

from __future__ import annotations

import hashlib
import os

NAME_MAX = 255  # bytes in one file name on Linux file systems (ext4, xfs, btrfs, tmpfs)


def printable(text: str) -> str:
    """``text`` as one line with nothing hidden, for logs and error files (ordinary names are unchanged).

    Non-printable characters (newlines, escapes, bidi overrides) and bytes that are
    not UTF-8 (``os.fsdecode``'s surrogate escapes) become ``\\xNN`` / ``\\uNNNN``:
    a file name cannot forge log or error-file lines. Backslashes are kept, so the
    escaping is idempotent: text escaped once (a ledger name) is not escaped again.

    Args:
        text: a file name, or a message that may contain one.

    Returns:
        The escaped text.
    """
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte of a file name
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def fit_name(stem: str, suffix: str = "", limit: int = NAME_MAX) -> str:
    """``stem + suffix``, or, if longer than ``limit`` bytes, its suffix after the stem's start and a hash.

    The stem is cut on a UTF-8 character boundary and followed by ``~`` and 8 hex
    digits of the whole name's sha256: recognisable, and long names stay distinct.

    Args:
        stem: the name without ``suffix``.
        suffix: kept whole (``.jsonl``, ``.error.txt``), unless it alone is long.
        limit: the most bytes the name may have.

    Returns:
        The name, of at most ``limit`` bytes once encoded with ``os.fsencode``.
    """
    name = stem + suffix
    whole = os.fsencode(name)
    if len(whole) <= limit:
        return name
    if len(os.fsencode(suffix)) > limit // 4:
        stem, suffix = name, ""
    tag = f"~{hashlib.sha256(whole).hexdigest()[:8]}{suffix}"
    head = os.fsencode(stem)
    cut = max(limit - len(os.fsencode(tag)), 0)
    for _ in range(3):  # back off to the first byte of a UTF-8 character
        if 0 < cut < len(head) and head[cut] & 0xC0 == 0x80:
            cut -= 1
    return os.fsdecode(head[:cut]) + tag


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun`` for a message, the noun plural unless ``n`` is 1: ``1 file``, ``2 files``, ``0 slices``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
