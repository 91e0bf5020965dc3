"""File boundaries: the ends of the last done files are kept out of checkpoint rotation.

Three files are trained once for the module (``save_total_limit 1``, a checkpoint every 5
steps); each test works on a copy of that tree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Tree, stdlib_documents, train, write_jsonl

from daemon.ledger import Ledger
from daemon.rollback import kept_file_ends

SMALL_ROTATION = {"save_steps": 5, "save_total_limit": 1}  # would keep only the newest and the file's start


def _text_file(path: Path, n: int, offset: int) -> Path:
    return write_jsonl(path, [{"text": d} for d in stdlib_documents(limit=n + offset)[offset:]])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Tree, list[dict]]:
    """A tree with three done files a, b, c (default ``--keep_file_checkpoints 3``) and their history rows."""
    tree = Tree(tmp_path_factory.mktemp("trained"))
    files = [_text_file(tree.root / f"{name}.jsonl", 10, 10 * i) for i, name in enumerate("abc")]
    return tree, [train(tree, data, **SMALL_ROTATION) for data in files]


def _checkpoint_steps(tree: Tree) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in tree.output.glob("checkpoint-*"))


def test_file_ends_are_kept_out_of_a_small_save_total_limit(trained):
    tree, rows = trained
    ends = [row["end_step"] for row in rows]
    assert ends[-1] - ends[0] > 2 * SMALL_ROTATION["save_steps"]  # mid-file checkpoints were saved and rotated
    assert _checkpoint_steps(tree) == ends  # without --keep_file_checkpoints: the last two only
    ledger = Ledger(tree.status)
    assert kept_file_ends(ledger, 3) == set(ends)
    assert kept_file_ends(ledger, 1) == {ends[-1]}
    assert kept_file_ends(ledger, 0) == set()
