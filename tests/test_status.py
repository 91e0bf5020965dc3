"""The status document, history rows and their invariant check."""

from __future__ import annotations

import json
import os
import stat

import pytest

from daemon.store.records import HistoryRow, Outcome
from daemon.store.status import Heartbeat, StatusFile, empty_status, history_violations, read_history
from daemon.views.summary import format_summary


def _row(name: str, start: int, end: int | None, planned: int | None, outcome: str = "done") -> HistoryRow:
    return HistoryRow(
        file=name,
        sha256=f"sha-of-{name}",
        start_step=start,
        end_step=end,
        planned_steps=planned,
        examples=None,
        tokens=None,
        wall_seconds=1.0,
        train_seconds=None,
        train_loss=1.0,
        eval_loss=None,
        outcome=Outcome(outcome),
        error=None if outcome == "done" else "bad",
        finished_at="2026-01-01T00:00:00Z",
    )


def test_updates_merge_fields_from_different_writers(tmp_path):
    status = StatusFile(tmp_path)
    status.update(state="training", global_step=5)
    status.update(lambda doc: doc.update(queue=["a.jsonl"]))
    doc = json.loads(status.path.read_text())
    assert doc["state"] == "training" and doc["global_step"] == 5 and doc["queue"] == ["a.jsonl"]
    assert set(empty_status()) <= set(doc)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_an_outcome_appends_history_and_counts_it(tmp_path):
    status = StatusFile(tmp_path)
    status.record_outcome(_row("a.jsonl", 0, 4, 4))
    status.record_outcome(_row("b.jsonl", 4, None, 3, outcome="failed"))
    assert [r["file"] for r in read_history(tmp_path)] == ["a.jsonl", "b.jsonl"]
    doc = status.read()
    assert doc["files"] == {"queued": 0, "done": 1, "failed": 1}
    assert doc["last_error"]["file"] == "b.jsonl"


def test_heartbeat_writes_on_its_timer_and_once_more_when_stopped(tmp_path):
    status = StatusFile(tmp_path)
    beat = Heartbeat(status, interval=0.02)
    beat.set(state="training", global_step=1)
    beat.start()
    try:
        beat.set(global_step=2)
    finally:
        beat.stop()
    assert not beat.is_alive()
    assert status.read()["global_step"] == 2


def test_history_violations_catch_zero_steps_gaps_and_miscounts():
    assert (
        history_violations(
            [_row("a", 0, 4, 4).as_dict(), _row("x", 4, None, 2, "failed").as_dict(), _row("b", 4, 9, 5).as_dict()]
        )
        == []
    )
    assert history_violations([_row("a", 0, 0, 0).as_dict()]) == ["a: done with 0 planned steps"]
    assert history_violations([_row("a", 0, 4, 4).as_dict(), _row("b", 3, 8, 5).as_dict()]) == [
        "b: starts at step 3, the previous file ended at 4"
    ]
    assert history_violations([_row("a", 0, 3, 4).as_dict()]) == ["a: trained 3 steps (0 -> 3), planned 4"]


def test_rolled_back_steps_never_count_and_the_same_file_may_train_again_after_a_rollback(tmp_path):
    status = StatusFile(tmp_path)
    a, b, c = _row("a", 0, 4, 4), _row("b", 4, 9, 5), _row("c", 9, 12, 3)
    for row in (a, b, c):
        status.record_outcome(row)
    for row in (c, b):  # what a rollback to step 4 appends, twice when it is finished again after a kill
        for _ in range(2):
            status.record_outcome(HistoryRow.rolled_back(row.file, row.sha256, row.start_step, row.end_step, 0, 4))
    status.record_outcome(b)  # b dropped again: trained again from step 4, a new done row
    status.record_outcome(b)  # ... and finished a second time after a crash: not repeated
    rows = read_history(tmp_path)
    assert [(r["file"], r["outcome"]) for r in rows] == [
        ("a", "done"),
        ("b", "done"),
        ("c", "done"),
        ("c", "rolled_back"),
        ("b", "rolled_back"),
        ("b", "done"),
    ]
    assert rows[3]["error"] == "rolled back to step 4"
    assert history_violations(rows) == []
    assert history_violations(rows[:5] + [_row("d", 9, 12, 3).as_dict()]) == [
        "d: starts at step 9, the previous file ended at 4"
    ]
    assert status.read()["files"] == {"queued": 0, "done": 2, "failed": 0, "rolled_back": 2}
    assert "  rolled_back c: rolled back to step 4" in format_summary(status.read(), history=rows)


@pytest.mark.parametrize("state", ["idle", "training"])
def test_summary_names_state_step_files_and_recent_history(state):
    doc = empty_status()
    doc.update(state=state, global_step=7, max_steps=10)
    doc["current_file"] = {
        "name": "a.jsonl",
        "steps_done": 3,
        "planned_steps": 6,
        "progress": 0.5,
        "eta_seconds": 12,
        "examples": 40,
        "tokens": 1000,
    }
    text = format_summary(
        doc, history=[_row("old.jsonl", 0, 4, 4).as_dict(), _row("bad.jsonl", 4, None, 1, "failed").as_dict()]
    )
    assert f"state        {state}" in text
    assert "global_step  7 of max_steps 10" in text
    assert "a.jsonl: step 3/6 (50%)" in text
    assert "done   old.jsonl: steps 0 -> 4" in text
    assert "failed bad.jsonl: bad" in text


def test_a_history_line_torn_by_a_kill_is_skipped_and_does_not_swallow_the_next_row(tmp_path):
    status = StatusFile(tmp_path)
    status.record_outcome(_row("a.jsonl", 0, 4, 4))
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write('{"file": "b.jsonl", "start_st')  # killed mid-append
    status.record_outcome(_row("b.jsonl", 4, 6, 2))
    assert [r["file"] for r in read_history(tmp_path)] == ["a.jsonl", "b.jsonl"]
    status.record_outcome(_row("b.jsonl", 4, 6, 2))  # finished again after a crash: not repeated
    assert len(read_history(tmp_path)) == 2


@pytest.mark.parametrize(
    ("umask", "mode"), [(0o077, 0o600), (0o027, 0o640), (0o022, 0o644)], ids=["umask077", "umask027", "umask022"]
)
def test_status_files_get_the_mode_the_umask_gives_a_plain_open(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        StatusFile(tmp_path).update(state="training")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "training_status.json").stat().st_mode) == mode


def test_the_loss_series_keeps_the_running_line_when_steps_are_trained_again(tmp_path):
    from daemon.store.status import append_loss_points, read_loss_series

    beat = Heartbeat(StatusFile(tmp_path), interval=60)
    for step in (1, 2, 3, 4):  # a file, then a resume from the checkpoint at step 2
        beat.add_loss_point({"step": step, "file": "a", "loss": 9.0})
    beat.flush()
    with open(tmp_path / "loss.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # torn by a kill
    append_loss_points(tmp_path, [{"step": 3, "file": "a", "loss": 1.0}, {"step": 4, "file": "b", "loss": 1.0}])
    assert [(p["step"], p["loss"]) for p in read_loss_series(tmp_path)] == [(1, 9.0), (2, 9.0), (3, 1.0), (4, 1.0)]
