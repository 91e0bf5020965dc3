"""Turn folders of text files (a source repository, notes) into ``{"text": ...}`` JSON lines.

    python -m daemon.make_dataset DIR [DIR ...] OUT.jsonl [--max_chars 16000] [--glob '*.txt'] [--docstrings]

Files are read in sorted order; hidden folders and ``__pycache__`` are skipped,
so are binary files (a NUL byte in the first 8 KiB, or not UTF-8). ``--glob`` keeps
only the files whose name matches; ``--docstrings`` keeps only the docstrings of
Python files (module, classes, functions: prose, not code). A file longer than
``--max_chars`` is split at line boundaries into several documents. The output is
written to a temporary file and renamed, so it is never seen half-written.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from daemon.store.files import atomic_writer

SKIPPED_DIRS = {"__pycache__", "node_modules"}


def iter_text_files(root: Path, pattern: str = "*") -> Iterator[Path]:
    """Regular files below ``root`` whose name matches ``pattern``, in sorted order, without hidden or cache folders."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIPPED_DIRS)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and fnmatch.fnmatch(name, pattern) and path.is_file() and not path.is_symlink():
                yield path


def docstrings(source: str) -> str | None:
    """The docstrings of a Python module (its own, its classes' and functions'), blank-line separated.

    None when the source does not parse.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
    return "\n\n".join(doc for doc in found if doc)


def read_text(path: Path) -> str | None:
    """The file's text, or None when it is binary (NUL bytes in its first 8 KiB, or not UTF-8)."""
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def split_text(text: str, max_chars: int) -> list[str]:
    """Split at line boundaries into pieces of at most ``max_chars`` (a longer single line is cut)."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            pieces.append(line[:max_chars])
            line = line[max_chars:]
        if size + len(line) > max_chars and current:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append("".join(current))
    return [p for p in pieces if p.strip()]


def make_dataset(
    roots: list[Path], out: Path, max_chars: int, pattern: str = "*", only_docstrings: bool = False
) -> tuple[int, int, int]:
    """Write the JSONL file, one file's documents at a time (memory bounded by the largest file).

    Args:
        roots: folders to read.
        out: the JSONL file.
        max_chars: longest document, in characters.
        pattern: only files whose name matches (``fnmatch``).
        only_docstrings: keep the docstrings of ``.py`` files only (other files are skipped).

    Returns:
        ``(documents, files used, files skipped)``: binary files, or with ``only_docstrings``
        files that are not Python or do not parse.
    """
    docs = used = skipped = 0
    with atomic_writer(out) as f:
        for root in roots:
            for path in iter_text_files(root, pattern):
                text = read_text(path)
                if only_docstrings and text is not None:
                    text = docstrings(text) if path.suffix == ".py" else None
                if text is None:
                    skipped += 1
                    continue
                pieces = split_text(text, max_chars)
                used += bool(pieces)
                docs += len(pieces)
                f.writelines(json.dumps({"text": piece}, ensure_ascii=False) + "\n" for piece in pieces)
    return docs, used, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.make_dataset", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="DIR [DIR ...] OUT.jsonl")
    parser.add_argument("--max_chars", type=int, default=16000, help="Longest document, in characters.")
    parser.add_argument("--glob", default="*", help="Only files whose name matches, e.g. '*.txt' (default: all).")
    parser.add_argument("--docstrings", action="store_true", help="Only the docstrings of Python files (prose).")
    args = parser.parse_args(argv)
    if len(args.paths) < 2:
        parser.error("give at least one DIR and the OUT.jsonl file")
    *roots, out = (Path(p) for p in args.paths)
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        print(f"error: not a directory: {', '.join(missing)}", file=sys.stderr)
        return 1
    if args.max_chars < 1:
        parser.error("--max_chars must be >= 1")
    docs, used, skipped = make_dataset(roots, out, args.max_chars, args.glob, args.docstrings)
    what = "files without docstrings" if args.docstrings else "binary files"
    print(f"wrote {docs} documents from {used} files to {out} (skipped {skipped} {what})")
    return 0 if docs else 1


if __name__ == "__main__":
    sys.exit(main())
