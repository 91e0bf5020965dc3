"""The SQLite ledger of every file seen."""

from __future__ import annotations

import sqlite3
import threading

from daemon.ledger import Ledger


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
