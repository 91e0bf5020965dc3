"""``python -m daemon rebuild-ledger``: a damaged ledger rebuilt from the history, the checkpoints and the inbox."""

from __future__ import annotations

import hashlib
import time

from helpers import Tree, fake_checkpoint

from daemon.__main__ import main
from daemon.service.rebuild import rebuild_ledger
from daemon.store.ledger import Ledger
from daemon.store.ledger_file import LEDGER_FILE
from daemon.store.records import FileProgress, FileState, HistoryRow
from daemon.store.status import StatusFile

STEPS = 3


def _history(tree: Tree, names: list[str], roll_back_last: bool = False) -> dict[str, str]:
    """Done rows for ``names`` trained one after the other (3 steps each); the last one rolled back if asked."""
    status, shas = StatusFile(tree.status), {}
    for i, name in enumerate(names):
        shas[name] = hashlib.sha256(name.encode()).hexdigest()
        progress = FileProgress(name, shas[name], 12, 0, 384, 0, i * STEPS, STEPS)
        status.record_outcome(HistoryRow.done(progress, time.monotonic(), 0.1, 2.0, None))
    if roll_back_last:
        start = (len(names) - 1) * STEPS
        status.record_outcome(HistoryRow.rolled_back(names[-1], shas[names[-1]], start, start + STEPS, STEPS, start))
    return shas


def _damage(tree: Tree) -> bytes:
    garbage = b"\x00not a database" * 256
    (tree.status / LEDGER_FILE).write_bytes(garbage)
    return garbage


def test_a_damaged_ledger_is_rebuilt_with_the_done_files_that_stand_and_the_old_one_kept_aside(tree):
    shas = _history(tree, ["a.jsonl", "b.jsonl"], roll_back_last=True)
    garbage = _damage(tree)
    fake_checkpoint(tree.output, STEPS)
    lines = rebuild_ledger(tree.status, tree.output, tree.inbox)
    (aside,) = tree.status.glob(f"{LEDGER_FILE}.damaged-*")
    assert aside.read_bytes() == garbage
    (entry,) = Ledger(tree.status).entries()  # b.jsonl was rolled back: its content may train again
    assert (entry.name, entry.sha256, entry.state) == ("a.jsonl", shas["a.jsonl"], FileState.DONE)
    assert (entry.start_step, entry.planned_steps, entry.end_step) == (0, STEPS, STEPS)
    assert entry.filed_at is not None  # not in processing/: a new drop of it is a duplicate, not this claim
    assert not any(line.startswith("warning:") for line in lines)


def test_a_done_file_still_in_processing_keeps_its_claim_and_a_half_trained_file_is_pointed_out(tree):
    shas = _history(tree, ["a.jsonl", "b.jsonl", "c.jsonl"])
    _damage(tree)
    (tree.inbox / "processing").mkdir()
    (tree.inbox / "processing" / "c.jsonl").write_bytes(b"c.jsonl")  # its sha256 is the history's
    assert hashlib.sha256(b"c.jsonl").hexdigest() == shas["c.jsonl"]
    fake_checkpoint(tree.output, 3 * STEPS + 2)  # a fourth file half trained when the ledger broke
    lines = rebuild_ledger(tree.status, tree.output, tree.inbox)
    claim = Ledger(tree.status).find_claim("c.jsonl", shas["c.jsonl"])
    assert claim is not None and claim.state == FileState.DONE  # the daemon only files it away
    (warning,) = [line for line in lines if line.startswith("warning:")]
    assert f"checkpoint-{3 * STEPS + 2}" in warning and f"rollback --to_step {3 * STEPS}" in warning


def test_a_ledger_that_opens_is_not_rebuilt_without_force(tree, capsys):
    Ledger(tree.status).add("a.jsonl", FileState.QUEUED)
    argv = ["rebuild-ledger", "--status_dir", str(tree.status), "--output_dir", str(tree.output)]
    assert main([*argv, "--inbox_dir", str(tree.inbox)]) == 1
    assert "opens fine: nothing to rebuild" in capsys.readouterr().err
    assert [e.name for e in Ledger(tree.status).entries()] == ["a.jsonl"]
    assert list(tree.status.glob("*.damaged-*")) == []


def test_a_rollback_interrupted_before_the_ledger_was_rebuilt_still_finishes(tmp_path):
    """A rollback killed after writing its intent, then the ledger rebuilt (its rows numbered anew): finishing the
    rollback found 'ledger row 3 does not exist', and every start failed with that traceback."""
    import json
    from dataclasses import asdict

    from helpers import new_tree, text_file, train

    from daemon.store.rollback import INTENT_FILE, RollbackIntent, RolledBackFile, finish_interrupted_rollback

    tree = new_tree(tmp_path / "t")
    Ledger(tree.status).add("x.jsonl", FileState.QUEUED)  # a file that never trained: the rebuilt ledger drops it
    first = train(tree, text_file(tmp_path / "a.jsonl", 0, 20))
    second = train(tree, text_file(tmp_path / "b.jsonl", 20, 20))
    b = Ledger(tree.status).find(second["sha256"])
    assert b is not None and b.id == 3
    undone = RolledBackFile(b.id, b.name, b.sha256, b.start_step, b.end_step, b.planned_steps)
    intent = RollbackIntent(first["end_step"], str(tree.output.resolve()), [undone])
    (tree.status / INTENT_FILE).write_text(json.dumps(asdict(intent)))  # killed here, before touching anything
    rebuild_ledger(tree.status, tree.output, tree.inbox, force=True)
    assert [(e.id, e.name) for e in Ledger(tree.status).entries()] == [(1, "a.jsonl"), (2, "b.jsonl")]
    assert finish_interrupted_rollback(tree.output, tree.status) is not None
    assert {e.name: e.state for e in Ledger(tree.status).entries()} == {
        "a.jsonl": FileState.DONE,
        "b.jsonl": FileState.ROLLED_BACK,
    }
    assert not (tree.status / INTENT_FILE).exists()
    assert not (tree.output / f"checkpoint-{second['end_step']}").exists()
