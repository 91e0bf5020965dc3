"""The SQLite ledger of every file seen."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from daemon.exceptions import DaemonError, LedgerError
from daemon.store.ledger import Ledger
from daemon.store.ledger_file import LEDGER_FILE


def test_a_file_moves_through_its_states_and_keeps_its_plan(tmp_path):
    ledger = Ledger(tmp_path)
    entry = ledger.add("a.jsonl", "queued", sha256="ab" * 32, size=10)
    entry = ledger.update(entry.id, state="training", start_step=4, planned_steps=6, attempts=entry.attempts + 1)
    assert (entry.state, entry.start_step, entry.planned_steps, entry.attempts) == ("training", 4, 6, 1)
    assert entry.finished_at is None
    entry = ledger.update(entry.id, state="done", end_step=10)
    assert entry.finished_at is not None
    assert ledger.find("ab" * 32, ("done",)) == entry
    assert ledger.find("cd" * 32) is None
    assert [e.name for e in ledger.entries("done")] == ["a.jsonl"]


def test_the_ledger_uses_wal_and_survives_reopening(tmp_path):
    Ledger(tmp_path).add("a.jsonl", "rejected", error="a symlink")
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    (entry,) = Ledger(tmp_path).entries()
    assert (entry.name, entry.state, entry.error) == ("a.jsonl", "rejected", "a symlink")


def test_concurrent_writers_do_not_lose_rows(tmp_path):
    ledger = Ledger(tmp_path)

    def add_many(prefix: str) -> None:
        for i in range(20):
            ledger.add(f"{prefix}-{i}.jsonl", "queued")

    threads = [threading.Thread(target=add_many, args=(p,)) for p in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ledger.entries()) == 60


def test_a_row_is_the_claim_of_its_file_only_until_the_file_is_filed_away(tmp_path):
    ledger = Ledger(tmp_path)
    done = ledger.add("a.jsonl", "queued", sha256="ab" * 32, size=10)
    ledger.finish(ledger.record_plan(done.id, 0, 3).id, 3)
    assert ledger.find_claim("a.jsonl", "ab" * 32) == ledger.get(done.id)  # finished, not yet moved to done/
    ledger.mark_filed(done.id)
    assert ledger.find_claim("a.jsonl", "ab" * 32) is None  # the same file dropped again is a new claim
    rejected = ledger.add("b\nforged", "rejected", error="a FIFO")
    assert rejected.name == "b\\x0aforged" and ledger.find_claim("b\nforged", None) == rejected
    assert ledger.mark_filed_unless_claimed(["b\nforged"]) == 0  # still there: still its row
    assert ledger.mark_filed_unless_claimed([]) == 1


def _delete_ledger(folder) -> None:
    for suffix in ("", "-wal", "-shm"):
        (folder / f"{LEDGER_FILE}{suffix}").unlink(missing_ok=True)


def test_a_ledger_deleted_while_in_use_is_refused_instead_of_read_under_reused_row_ids(tmp_path):
    daemons = Ledger(tmp_path)
    claim = daemons.add("a.jsonl", "queued", sha256="ab" * 32, size=10)
    _delete_ledger(tmp_path)
    other = Ledger(tmp_path).add("other.jsonl", "queued", sha256="cd" * 32, size=3)  # a new file: ids restart
    assert other.id == claim.id
    with pytest.raises(DaemonError, match="ledger.sqlite was deleted or replaced"):
        daemons.get(claim.id)  # never the unrelated row that now has this id
    with pytest.raises(DaemonError, match="ledger.sqlite was deleted or replaced"):
        daemons.fail(claim.id, "boom")
    assert Ledger(tmp_path).get(other.id).state == "queued"  # the other file's row is left alone


def test_a_deleted_ledger_is_not_silently_recreated_by_the_process_using_it(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.add("a.jsonl", "queued")
    _delete_ledger(tmp_path)
    with pytest.raises(DaemonError, match="ledger.sqlite was deleted or replaced"):
        ledger.entries()
    assert not (tmp_path / LEDGER_FILE).exists()


def test_a_training_process_refuses_a_ledger_other_than_its_daemons(tmp_path):
    daemons = Ledger(tmp_path)
    assert Ledger(tmp_path, instance=daemons.instance).instance == daemons.instance
    with pytest.raises(DaemonError, match="not the daemon's"):
        Ledger(tmp_path, instance="0" * 32)
    _delete_ledger(tmp_path)
    with pytest.raises(DaemonError, match="missing"):
        Ledger(tmp_path, instance=daemons.instance)
    assert not (tmp_path / LEDGER_FILE).exists()  # the child does not create one


def test_a_ledger_made_before_instance_ids_gets_one(tmp_path):
    with sqlite3.connect(tmp_path / LEDGER_FILE) as db:
        db.execute(
            "CREATE TABLE files (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, sha256 TEXT, "
            "size INTEGER, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, start_step INTEGER, "
            "planned_steps INTEGER, end_step INTEGER, created_at TEXT NOT NULL, updated_at TEXT NOT NULL, "
            "finished_at TEXT, error TEXT)"
        )
    first, second = Ledger(tmp_path), Ledger(tmp_path)
    assert first.instance and first.instance == second.instance


def test_only_done_rows_are_rolled_back_and_all_of_them_or_none(tmp_path):
    ledger = Ledger(tmp_path)
    done = [
        ledger.finish(ledger.record_plan(ledger.add(f"{n}.jsonl", "queued").id, 3 * i, 3).id, 3 * i + 3)
        for i, n in enumerate("ab")
    ]
    training = ledger.record_plan(ledger.add("c.jsonl", "queued").id, 6, 3)
    with pytest.raises(ValueError, match="training -> rolled_back is not allowed"):
        ledger.roll_back([done[1].id, training.id], to_step=3)
    assert ledger.get(done[1].id) == done[1]  # the transaction wrote nothing
    with pytest.raises(ValueError, match="is not allowed"):
        ledger.update(training.id, state="rolled_back")
    (rolled,) = ledger.roll_back([done[1].id], to_step=3)
    assert (rolled.state, rolled.error, rolled.end_step, rolled.finished_at) == (
        "rolled_back",
        "rolled back to step 3",
        6,
        done[1].finished_at,
    )
    assert ledger.roll_back([done[1].id], to_step=3) == [rolled]  # finished again after a kill: no change
    with pytest.raises(ValueError, match="rolled_back -> done is not allowed"):
        ledger.finish(rolled.id, 6)


def test_a_damaged_ledger_is_refused_with_one_line_naming_it_and_how_to_rebuild_it(tmp_path):
    garbage = bytes(range(256)) * 16
    (tmp_path / LEDGER_FILE).write_bytes(garbage)
    with pytest.raises(LedgerError) as refused:
        Ledger(tmp_path)
    message = str(refused.value)
    assert str(tmp_path / LEDGER_FILE) in message and "damaged" in message and "rebuild-ledger" in message
    assert "\n" not in message
    assert (tmp_path / LEDGER_FILE).read_bytes() == garbage  # left as it was, for the rebuild or a post-mortem


def test_a_ledger_damaged_while_in_use_is_refused_with_the_same_line(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.add("a.jsonl", "queued")
    _delete_ledger(tmp_path)
    (tmp_path / LEDGER_FILE).write_bytes(b"\x00garbage" * 512)
    with pytest.raises(LedgerError, match="damaged"):
        ledger.entries()


def test_a_ledger_another_program_keeps_locked_is_refused_with_one_line_after_the_busy_timeout(tmp_path, monkeypatch):
    ledger = Ledger(tmp_path)
    monkeypatch.setattr("daemon.store.ledger_file.LEDGER_BUSY_SECONDS", 0.2)
    holder = sqlite3.connect(tmp_path / LEDGER_FILE, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # a sqlite3 shell in the middle of a write, say
        with pytest.raises(LedgerError, match="stayed locked by another program") as refused:
            ledger.add("a.jsonl", "queued")
        assert str(tmp_path / LEDGER_FILE) in str(refused.value)
    finally:
        holder.close()
    assert ledger.add("a.jsonl", "queued").state == "queued"  # released: the ledger is usable again


def test_a_bug_in_a_query_keeps_its_sqlite_error_and_traceback(tmp_path):
    ledger = Ledger(tmp_path)
    with pytest.raises(sqlite3.OperationalError, match="no such column"):
        ledger.update(ledger.add("a.jsonl", "queued").id, no_such_column=1)
