"""The evaluation suite on disk: its slices, and the fixed subset of each (docs/evaluation.md).

Slices, each an ordinary JSONL file in one of the three shapes (:mod:`daemon.store.jsonl`), so a
slice outlives a tokenizer change:

- every done file's held-out slice (kind ``held_out``), kept as raw records in
  ``<status_dir>/eval_suite/<end_step:08d>-<file stem>.jsonl`` (the name of its evolution
  snapshot; :func:`daemon.training.data.heldout_records` makes the records). It is written when its
  file is done and belongs to the suite of every later file. Its size is bounded by
  ``--max_eval_examples`` held-out examples.
- every ``--eval_files`` file (kind ``eval_file``, slice ``eval:<name>``), read again after
  each file, of which at most ``--max_eval_examples`` examples are used.

**The subset.** Example ``i`` of a slice ranks by ``blake2b(f"{SUBSET_SEED}:{i}")``; a slice
evaluated on ``k`` examples uses its ``k`` first by rank (:func:`subset`). The same ``k``
picks the same examples after every file, and a smaller ``k`` picks a prefix of a larger
one's, so numbers compare across files.

Standard library only: the daemon process (a manual roll-back) uses it without torch.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from daemon.exceptions import DaemonError
from daemon.names import NAME_MAX, fit_name, printable
from daemon.store.files import atomic_write_text

logger = logging.getLogger(__name__)

SUITE_DIR = "eval_suite"
# The base model's slice (daemon.training.base_slice) is slice_name(0, BASE_FILE): "00000000-base-model".
BASE_FILE = "base-model.jsonl"
SUBSET_SEED = 0  # not --seed: the subsets must stay the same whatever flags a later file uses
HELD_OUT, EVAL_FILE = "held_out", "eval_file"
_SLICE_RE = re.compile(r"^(\d+)-.*\.jsonl$")
T = TypeVar("T")


def subset(items: Iterable[T], k: int | None = None) -> list[T]:
    """The first ``k`` of ``items`` (all of them with None) in the suite's fixed seeded order.

    The order is by ``blake2b(f"{SUBSET_SEED}:{position}")``: it depends only on the
    positions, so the first ``k`` are the same every time and a prefix of the first ``k + 1``.
    Streams ``items``, holding at most ``k`` of them.
    """

    def rank(pair: tuple[int, T]) -> bytes:
        return hashlib.blake2b(f"{SUBSET_SEED}:{pair[0]}".encode(), digest_size=8).digest()

    pairs = enumerate(items)
    chosen = sorted(pairs, key=rank) if k is None else heapq.nsmallest(k, pairs, key=rank)
    return [item for _, item in chosen]


@dataclass
class Slice:
    """One slice of the suite.

    Attributes:
        name: ``<end_step:08d>-<stem>`` for a held-out slice, ``eval:<file name>`` for an eval file.
        kind: ``held_out`` or ``eval_file``.
        shape: the records' shape (``text``, ``prompt_completion``, ``messages``).
        records: raw records in subset order: the first ``k`` are the subset of size ``k``.
    """

    name: str
    kind: str
    shape: str
    records: list[dict[str, Any]]


def slice_name(step: int, file_name: str) -> str:
    """The held-out slice of ``file_name`` done at ``step``: ``<step:08d>-<stem>``, as its snapshot folder."""
    return fit_name(f"{step:08d}-{Path(file_name).stem}", limit=NAME_MAX - len("..jsonl.0123456789ab.tmp"))


def write_slice(status_dir: str | Path, name: str, records: list[dict[str, Any]]) -> Path:
    """Write a held-out slice's raw records to ``eval_suite/<name>.jsonl``, atomically (replacing one there)."""
    path = Path(status_dir) / SUITE_DIR / f"{name}.jsonl"
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def step_files(folder: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    """``(end step, path)`` of the files in ``folder`` named ``<end step>-...`` by ``pattern``, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.match(p.name)))


def delete_after(files: Iterable[tuple[int, Path]], step: int) -> list[str]:
    """Delete the files (``(end step, path)``) of files that ended after ``step``; their printable stems."""
    dropped = []
    for end_step, path in files:
        if end_step > step:
            path.unlink(missing_ok=True)
            dropped.append(printable(path.stem))
    return dropped


def suite_files(status_dir: str | Path) -> list[tuple[int, Path]]:
    """``(end step, path)`` of every held-out slice on disk, oldest first."""
    return step_files(Path(status_dir) / SUITE_DIR, _SLICE_RE)


def drop_slices_after(status_dir: str | Path, step: int) -> list[str]:
    """Delete the held-out slices of files that ended after ``step`` (rolled back or failed); their names."""
    return delete_after(suite_files(status_dir), step)


def load_slice(path: str | Path, kind: str, text_field: str = "text", cap: int | None = None) -> Slice:
    """Read one slice file: at most ``cap`` records (all with None), in subset order.

    Raises:
        DatasetError: the file is missing, unreadable, or has no usable line.
    """
    from daemon.store.jsonl import iter_records, scan_jsonl

    path = Path(path)
    scan = scan_jsonl(path, text_field)
    return Slice(_name(path, kind), kind, scan.shape, subset(iter_records(scan, text_field), cap))


def _name(path: Path, kind: str) -> str:
    return f"eval:{printable(path.name)}" if kind == EVAL_FILE else printable(path.stem)


def load_suite(
    status_dir: str | Path, up_to_step: int, eval_files: list[str], text_field: str, cap: int
) -> tuple[list[Slice], list[dict[str, str]]]:
    """The slices a model is scored on besides its file's own: ``(slices, errors)``.

    The held-out slices of files done up to ``up_to_step`` (the current file's start),
    oldest first, then ``eval_files`` in the order given (each capped at ``cap`` examples;
    ``text_field`` names their documents' key). A slice that cannot be read becomes an
    error ``{"slice", "error"}`` and the suite goes on without it.
    """
    slices, errors = [], []
    sources = [(p, HELD_OUT, "text") for step, p in suite_files(status_dir) if step <= up_to_step]
    sources += [(Path(p), EVAL_FILE, text_field) for p in eval_files]
    for path, kind, key in sources:
        try:
            slices.append(load_slice(path, kind, key, cap if kind == EVAL_FILE else None))
        except (DaemonError, OSError, ValueError) as e:
            errors.append({"slice": _name(path, kind), "error": str(e)})
            logger.warning("evaluation slice %s cannot be read: %s", _name(path, kind), e)
    return slices, errors
