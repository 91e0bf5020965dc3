"""The inbox daemon: its per-file policy against a fake training process, then real daemons end to end.

The policy tests run :class:`~daemon.service.watcher.Daemon` in this process with
:class:`FakeTraining` in place of the supervisor: it writes the ledger, the status
and the history the way the real training child does, in milliseconds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import REPO, Tree, fake_checkpoint, run_cli, stdlib_documents, wait_for, write_jsonl

from daemon.config import DaemonArguments
from daemon.service.entries import sha256_of
from daemon.service.inbox import Inbox
from daemon.service.supervisor import ChildResult
from daemon.service.wake import Wake, new_observer
from daemon.service.watcher import Daemon
from daemon.store.ledger import Ledger, LedgerRow
from daemon.store.records import FileProgress, FileState, HistoryRow
from daemon.store.status import StatusFile, history_violations

PLANNED_STEPS = 3


class FakeTraining:
    """The supervisor and its training child, played from a script; no process is started.

    Each run plays the next outcome scripted for its file ("done" once the script is
    used up), leaving the ledger, status and history as the real child does:

    - ``done``: plan recorded (kept when resuming), a done history row, ledger ``done``, exit 0.
    - ``crash``: plan recorded, then killed (exit -9); the row stays ``training``.
    - ``stall``: plan recorded, then killed by the supervisor for making no progress.
    - ``bad``: the content is unusable: a failed history row, ledger ``failed``, exit 1.
    - ``raise:WHY``: plan recorded, then an exception: exit 1, leaving the reason ``RuntimeError: WHY``.
    - ``stop``: a SIGTERM arrives mid-file: plan recorded, the daemon's stop event set,
      the child checkpoints and exits 3 (interrupted).

    Args:
        script: outcomes per file name, in attempt order.
        while_training: called with the file name at the start of each run (to drop files meanwhile).
    """

    def __init__(
        self, script: dict[str, list[str]] | None = None, while_training: Callable[[str], None] | None = None
    ) -> None:
        self.script = {name: list(outcomes) for name, outcomes in (script or {}).items()}
        self.while_training = while_training
        self.runs: list[tuple[str, int]] = []  # (file name, ledger entry) of each attempt
        self.queues_seen: list[list[str]] = []  # the status queue while each attempt ran
        self.spares_stopped = 0
        self.reports = 0  # refresh_report calls: one per filed-away file
        self.spares_started: list[str | None] = []  # the file training at each start_spare call (None: idle)
        self.spare_line_argv: list[list[str] | None] = []  # the line's flags given to each start_spare call
        self._training: str | None = None

    @property
    def files(self) -> list[str]:
        return [name for name, _ in self.runs]

    def run(
        self, train_args: list[str], stop: threading.Event, on_poll: Callable[[], None] | None = None
    ) -> ChildResult:
        flags = dict(zip(train_args[::2], train_args[1::2], strict=True))  # the daemon passes --flag value pairs
        name, entry_id = Path(flags["--dataset"]).name, int(flags["--ledger_id"])
        ledger, status = Ledger(flags["--status_dir"]), StatusFile(flags["--status_dir"])
        self.runs.append((name, entry_id))
        if self.while_training is not None:
            self.while_training(name)
        self._training = name
        if on_poll is not None:
            on_poll()
        self._training = None
        self.queues_seen.append(status.read()["queue"])
        outcome = self.script[name].pop(0) if self.script.get(name) else "done"
        if outcome == "bad":
            ledger.fail(entry_id, "no usable examples")
            status.record_outcome(HistoryRow.failed(name, "no usable examples"))
            return ChildResult(1)
        entry = ledger.get(entry_id)
        assert entry is not None
        if entry.state == FileState.QUEUED:
            entry = ledger.record_plan(entry_id, start_step=status.read()["global_step"], planned_steps=PLANNED_STEPS)
        assert entry.start_step is not None and entry.planned_steps is not None
        if outcome == "done":
            end = entry.start_step + entry.planned_steps
            progress = FileProgress(name, entry.sha256 or "", 12, 0, 384, 0, entry.start_step, entry.planned_steps)
            status.record_outcome(HistoryRow.done(progress, time.monotonic(), 0.1, 2.0, None))
            ledger.finish(entry_id, end)
            status.update(global_step=end, max_steps=end)
            return ChildResult(0)
        if outcome == "stop":
            stop.set()
            return ChildResult(3)
        mid_file = Path(flags["--output_dir"]) / f"checkpoint-{entry.start_step + 1}"
        if not mid_file.exists():  # the real child checkpoints on its way (--save_steps)
            fake_checkpoint(mid_file.parent, entry.start_step + 1)
        if outcome.startswith("raise:"):
            return ChildResult(1, reason=f"RuntimeError: {outcome.removeprefix('raise:')}")
        return ChildResult(-9, stalled=outcome == "stall")

    def start_spare(self, line_argv: list[str] | None = None) -> None:
        self.spares_started.append(self._training)
        self.spare_line_argv.append(line_argv)

    def stop_spare(self) -> None:
        self.spares_stopped += 1

    def refresh_report(self) -> None:
        self.reports += 1

    def wait_report(self) -> None:
        pass

    def kill_all(self) -> None:
        pass


def _daemon(tree: Tree, training: FakeTraining, **options: object) -> Daemon:
    """A daemon on ``tree`` that trains with ``training``: ``--once`` unless ``options`` say otherwise."""
    args = DaemonArguments(
        inbox_dir=str(tree.inbox),
        status_dir=str(tree.status),
        output_dir=str(tree.output),
        **{"once": True, "settle_seconds": 0, **options},  # type: ignore[arg-type]
    )
    return Daemon(args, [], supervisor=training)


def _drop(tree: Tree, name: str, text: str, arrived: float) -> Path:
    """A complete file in the drop zone; ``arrived`` (its mtime) orders files dropped together."""
    path = tree.inbox / name
    path.write_text(text)
    os.utime(path, (arrived, arrived))
    return path


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _entry(tree: Tree, name: str) -> LedgerRow:
    (entry,) = [e for e in Ledger(tree.status).entries() if e.name == name]
    return entry


def _claimed_with_a_plan(tree: Tree) -> tuple[Ledger, LedgerRow]:
    """``processing/a.jsonl`` with its ledger row and plan, as a daemon killed mid-file leaves them."""
    claimed = tree.inbox / "processing" / "a.jsonl"
    claimed.parent.mkdir()
    claimed.write_text('{"text": "a"}\n')
    ledger = Ledger(tree.status)
    entry = ledger.add("a.jsonl", FileState.QUEUED, *sha256_of(claimed))
    return ledger, ledger.record_plan(entry.id, start_step=0, planned_steps=PLANNED_STEPS)


def _status(tree: Tree) -> dict:
    return json.loads((tree.status / "training_status.json").read_text())


def test_a_crashed_attempt_is_counted_and_the_retry_finishes_the_file(tree):
    _drop(tree, "a.jsonl", '{"text": "a"}\n', arrived=1000)
    training = FakeTraining({"a.jsonl": ["crash", "done"]})
    assert _daemon(tree, training).run() == 0
    first, second = training.runs
    assert first == second  # the same ledger row: the retry resumes the recorded plan
    assert _names(tree.inbox / "done") == ["a.jsonl"] and _names(tree.inbox / "failed") == []
    entry = _entry(tree, "a.jsonl")
    assert (entry.state, entry.attempts, entry.start_step, entry.end_step) == (FileState.DONE, 1, 0, PLANNED_STEPS)
    assert [(r["file"], r["outcome"]) for r in tree.history()] == [("a.jsonl", "done")]


def test_a_file_that_stalls_on_every_attempt_is_failed_after_max_attempts_and_the_next_file_trains(tree):
    _drop(tree, "a.jsonl", '{"text": "a"}\n', arrived=1000)
    _drop(tree, "b.jsonl", '{"text": "b"}\n', arrived=1001)
    training = FakeTraining({"a.jsonl": ["stall", "stall", "done"]})
    _daemon(tree, training, max_attempts=2).run()
    assert training.files == ["a.jsonl", "a.jsonl", "b.jsonl"]
    assert _names(tree.inbox / "failed") == ["a.jsonl", "a.jsonl.error.txt"]
    error = (tree.inbox / "failed" / "a.jsonl.error.txt").read_text()
    assert "stalled" in error and "gave up after 2 attempts" in error
    entry = _entry(tree, "a.jsonl")
    assert (entry.state, entry.attempts) == (FileState.FAILED, 2)
    failed_row, done_row = tree.history()
    assert (failed_row["file"], failed_row["outcome"], failed_row["sha256"]) == ("a.jsonl", "failed", entry.sha256)
    assert "gave up after 2 attempts" in failed_row["error"]
    assert (done_row["file"], done_row["outcome"]) == ("b.jsonl", "done")
    assert _names(tree.inbox / "done") == ["b.jsonl"]
    assert _status(tree)["files"] == {"queued": 0, "done": 1, "failed": 1} and _status(tree)["state"] == "idle"


def test_a_file_given_up_after_max_attempts_leaves_no_step_in_the_model(tree):
    fake_checkpoint(tree.output, 5)  # the running model before the file
    StatusFile(tree.status).update(global_step=5)
    _drop(tree, "a.jsonl", '{"text": "a"}\n', arrived=1000)
    _daemon(tree, FakeTraining({"a.jsonl": ["crash", "crash"]}), max_attempts=2).run()
    assert _entry(tree, "a.jsonl").state == FileState.FAILED
    assert _names(tree.output) == ["checkpoint-5"]  # the crashed attempts' checkpoint-6 is rolled back


def test_an_exception_that_repeats_fails_the_file_with_its_reason_on_the_second_attempt(tree):
    fake_checkpoint(tree.output, 5)
    StatusFile(tree.status).update(global_step=5)
    _drop(tree, "a.jsonl", '{"text": "a"}\n', arrived=1000)
    _drop(tree, "b.jsonl", '{"text": "b"}\n', arrived=1001)
    training = FakeTraining({"a.jsonl": ["raise:tokenizer exploded", "raise:tokenizer exploded", "done"]})
    _daemon(tree, training, max_attempts=3).run()
    assert training.files == ["a.jsonl", "a.jsonl", "b.jsonl"]  # not a third time: it would fail the same way
    reason = "RuntimeError: tokenizer exploded"
    error_file = (tree.inbox / "failed" / "a.jsonl.error.txt").read_text()
    assert reason in error_file and "the same way twice in a row" in error_file
    entry = _entry(tree, "a.jsonl")
    assert (entry.state, entry.attempts) == (FileState.FAILED, 2) and reason in (entry.error or "")
    failed_row = tree.history()[0]
    assert (failed_row["file"], failed_row["outcome"]) == ("a.jsonl", "failed") and reason in failed_row["error"]
    assert reason in _status(tree)["last_error"]["message"]
    assert _names(tree.output) == ["checkpoint-5"]  # the failed attempts' checkpoint-6 is rolled back


def test_exceptions_that_differ_are_retried_up_to_max_attempts_and_the_last_reason_is_kept(tree):
    _drop(tree, "a.jsonl", '{"text": "a"}\n', arrived=1000)
    training = FakeTraining({"a.jsonl": ["raise:first", "raise:second", "raise:third"]})
    _daemon(tree, training, max_attempts=3).run()
    assert training.files == ["a.jsonl"] * 3
    error_file = (tree.inbox / "failed" / "a.jsonl.error.txt").read_text()
    assert "RuntimeError: third" in error_file and "gave up after 3 attempts" in error_file
    entry = _entry(tree, "a.jsonl")
    assert (entry.state, entry.attempts) == (FileState.FAILED, 3)


def test_crashes_of_the_machines_kind_that_repeat_are_still_retried_up_to_max_attempts(tree):
    _drop(tree, "a.jsonl", '{"text": "a"}\n', arrived=1000)
    training = FakeTraining({"a.jsonl": ["crash", "crash", "done"]})
    _daemon(tree, training, max_attempts=3).run()
    assert training.files == ["a.jsonl"] * 3
    assert _names(tree.inbox / "done") == ["a.jsonl"]
    assert _entry(tree, "a.jsonl").attempts == 2


def test_a_file_the_training_process_fails_for_its_content_is_not_retried(tree):
    _drop(tree, "a.jsonl", "{nope\n", arrived=1000)
    training = FakeTraining({"a.jsonl": ["bad"]})
    _daemon(tree, training).run()
    assert training.files == ["a.jsonl"]
    assert "no usable examples" in (tree.inbox / "failed" / "a.jsonl.error.txt").read_text()
    entry = _entry(tree, "a.jsonl")
    assert (entry.state, entry.attempts) == (FileState.FAILED, 0)


def test_a_duplicate_is_skipped_into_failed_with_a_note_naming_the_earlier_file(tree):
    _drop(tree, "a.jsonl", '{"text": "same"}\n', arrived=1000)
    _drop(tree, "b.jsonl", '{"text": "same"}\n', arrived=1001)
    training = FakeTraining()
    _daemon(tree, training).run()
    assert training.files == ["a.jsonl"]
    assert _names(tree.inbox / "done") == ["a.jsonl"]
    note = (tree.inbox / "failed" / "b.jsonl.error.txt").read_text()
    assert "skipped: same content" in note and "as a.jsonl" in note and "--allow_duplicates" in note
    assert _entry(tree, "b.jsonl").state == FileState.DUPLICATE
    assert [r["file"] for r in tree.history()] == ["a.jsonl"]


def test_allow_duplicates_trains_the_same_content_again(tree):
    _drop(tree, "a.jsonl", '{"text": "same"}\n', arrived=1000)
    _drop(tree, "b.jsonl", '{"text": "same"}\n', arrived=1001)
    training = FakeTraining()
    _daemon(tree, training, allow_duplicates=True).run()
    assert training.files == ["a.jsonl", "b.jsonl"]
    assert _names(tree.inbox / "done") == ["a.jsonl", "b.jsonl"]
    assert [(r["start_step"], r["end_step"]) for r in tree.history()] == [(0, 3), (3, 6)]


@pytest.mark.parametrize("state", [FileState.DONE, FileState.FAILED])
def test_a_claimed_file_whose_ledger_row_is_finished_is_only_filed_away(tree, state):
    """The daemon was killed after the child had finished the file, before the file was moved."""
    ledger, entry = _claimed_with_a_plan(tree)
    if state == FileState.DONE:
        ledger.finish(entry.id, end_step=PLANNED_STEPS)
    else:
        ledger.fail(entry.id, "no usable examples")
    training = FakeTraining()
    _daemon(tree, training).run()
    assert training.runs == []
    assert [(e.id, e.state, e.attempts) for e in ledger.entries()] == [(entry.id, state, 0)]
    if state == FileState.DONE:
        assert _names(tree.inbox / "done") == ["a.jsonl"]
    else:
        assert "no usable examples" in (tree.inbox / "failed" / "a.jsonl.error.txt").read_text()
    assert _names(tree.inbox / "processing") == []


def test_a_stop_request_mid_file_leaves_it_claimed_and_the_next_start_resumes_it_first(tree):
    _drop(tree, "a.jsonl", '{"text": "a"}\n', arrived=1000)
    daemon = _daemon(tree, FakeTraining({"a.jsonl": ["stop"]}))
    assert daemon.run() == 0 and daemon.stop.is_set()
    assert _names(tree.inbox / "processing") == ["a.jsonl"]
    assert _status(tree)["state"] == "stopped"
    entry = _entry(tree, "a.jsonl")
    assert (entry.state, entry.attempts) == (FileState.TRAINING, 0)  # an interrupted attempt is no failure

    _drop(tree, "0-older.jsonl", '{"text": "older"}\n', arrived=10)  # dropped meanwhile, with an older mtime
    resumed = FakeTraining()
    _daemon(tree, resumed).run()
    assert resumed.runs == [("a.jsonl", entry.id), ("0-older.jsonl", entry.id + 1)]
    assert [(r["file"], r["start_step"], r["end_step"]) for r in tree.history()] == [
        ("a.jsonl", 0, 3),
        ("0-older.jsonl", 3, 6),
    ]
    assert _names(tree.inbox / "done") == ["0-older.jsonl", "a.jsonl"]
    assert history_violations(tree.history()) == []


def test_hostile_entries_are_rejected_unopened_and_never_reach_training(tree, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "secret.jsonl"
    outside.write_text('{"text": "secret"}\n')
    (tree.inbox / "a-symlink.jsonl").symlink_to(outside)
    os.mkfifo(tree.inbox / "b-fifo.jsonl")
    (tree.inbox / "c-directory").mkdir()
    os.link(outside, tree.inbox / "d-hardlink.jsonl")
    _drop(tree, "e-good.jsonl", '{"text": "good"}\n', arrived=2000)
    training = FakeTraining()
    _daemon(tree, training).run()
    assert training.files == ["e-good.jsonl"]
    reasons = {
        "a-symlink.jsonl": "symbolic link",
        "b-fifo.jsonl": "FIFO",
        "c-directory": "directory",
        "d-hardlink.jsonl": "hard link",
    }
    for name, reason in reasons.items():
        assert os.path.lexists(tree.inbox / "failed" / name), name
        error = (tree.inbox / "failed" / f"{name}.error.txt").read_text()
        assert f"rejected without opening it: a {reason}" in error, name
        assert _entry(tree, name).state == FileState.REJECTED
    assert outside.read_text() == '{"text": "secret"}\n'
    assert _names(tree.inbox / "done") == ["e-good.jsonl"]
    assert _status(tree)["last_error"]["message"].startswith("rejected: ")


def test_files_dropped_while_a_file_trains_show_in_the_status_queue(tree):
    _drop(tree, "a.jsonl", '{"text": "a"}\n', arrived=1000)

    def drop_next(name: str) -> None:
        if name == "a.jsonl":
            _drop(tree, "b.jsonl", '{"text": "b"}\n', arrived=time.time())

    training = FakeTraining(while_training=drop_next)
    _daemon(tree, training).run()
    assert training.files == ["a.jsonl", "b.jsonl"]
    assert training.queues_seen == [["b.jsonl"], []]
    # b's process is prestarted while a trains; with --once, the last file prestarts nothing
    assert training.spares_started == ["a.jsonl"]
    assert training.spare_line_argv == [None]  # while a file trains, the spare only imports: no CPU taken from it
    assert training.spares_stopped == 1  # on the way out the daemon stops its prestarted process
    assert training.reports == 2  # the daemon, not the training process, redraws the report after each file


def test_a_failed_file_moved_back_unchanged_is_trained_again_not_refiled_with_its_old_error(tree):
    _drop(tree, "a.jsonl", '{"text": "a"}\n', arrived=1000)
    _daemon(tree, FakeTraining({"a.jsonl": ["stall"]}), max_attempts=1).run()
    assert _names(tree.inbox / "failed") == ["a.jsonl", "a.jsonl.error.txt"]
    (tree.inbox / "failed" / "a.jsonl").rename(tree.inbox / "a.jsonl")  # docs/guarantees.md "Re-queueing ..."
    training = FakeTraining()
    _daemon(tree, training, max_attempts=1).run()
    assert training.files == ["a.jsonl"]
    assert _names(tree.inbox / "done") == ["a.jsonl"]
    assert [e.state for e in Ledger(tree.status).entries()] == [FileState.FAILED, FileState.DONE]


def test_a_done_file_dropped_again_under_its_name_with_allow_duplicates_is_trained_again(tree):
    _drop(tree, "a.jsonl", '{"text": "a"}\n', arrived=1000)
    _daemon(tree, FakeTraining(), allow_duplicates=True).run()
    fake_checkpoint(tree.output, 3)  # what the real child leaves at the end of the file
    (tree.inbox / "done" / "a.jsonl").rename(tree.inbox / "a.jsonl")
    training = FakeTraining()
    _daemon(tree, training, allow_duplicates=True).run()
    assert training.files == ["a.jsonl"]
    assert [(r["file"], r["start_step"], r["end_step"]) for r in tree.history()] == [
        ("a.jsonl", 0, 3),
        ("a.jsonl", 3, 6),
    ]
    assert _names(tree.inbox / "done") == ["a.jsonl"]


def test_a_done_row_of_a_file_already_filed_by_an_older_daemon_does_not_answer_a_new_drop(tree):
    """A ledger written before rows were marked filed (or a crash between the move and the mark)."""
    text = '{"text": "a"}\n'
    old_schema = (
        "CREATE TABLE files (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, sha256 TEXT, size INTEGER, "
        "state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, start_step INTEGER, planned_steps INTEGER, "
        "end_step INTEGER, created_at TEXT NOT NULL, updated_at TEXT NOT NULL, finished_at TEXT, error TEXT)"
    )
    with sqlite3.connect(tree.status / "ledger.sqlite") as db:
        db.execute(old_schema)
        db.execute(
            "INSERT INTO files (name, sha256, size, state, start_step, planned_steps, end_step, created_at, "
            "updated_at, finished_at) VALUES ('a.jsonl', ?, ?, 'done', 0, 3, 3, 'then', 'then', 'then')",
            (hashlib.sha256(text.encode()).hexdigest(), len(text)),
        )
    db.close()
    _drop(tree, "a.jsonl", text, arrived=1000)
    training = FakeTraining()
    _daemon(tree, training, allow_duplicates=True).run()
    assert training.files == ["a.jsonl"]
    assert [(e.state, e.filed_at is not None) for e in Ledger(tree.status).entries()] == [
        (FileState.DONE, True),
        (FileState.DONE, True),
    ]


def test_a_processing_folder_replaced_by_a_symlink_is_rejected_and_nothing_outside_is_trained(tree, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.jsonl").write_text('{"text": "secret"}\n')
    (tree.inbox / "processing").symlink_to(outside)
    _drop(tree, "a.jsonl", '{"text": "a"}\n', arrived=1000)
    training = FakeTraining()
    _daemon(tree, training).run()
    assert training.files == ["a.jsonl"]
    assert _names(outside) == ["secret.jsonl"] and (outside / "secret.jsonl").read_text() == '{"text": "secret"}\n'
    assert (tree.inbox / "failed" / "processing.not-a-folder").is_symlink()
    assert "a symbolic link" in (tree.inbox / "failed" / "processing.not-a-folder.error.txt").read_text()
    assert _names(tree.inbox / "done") == ["a.jsonl"] and not (tree.inbox / "processing").is_symlink()


@pytest.mark.parametrize(("folder", "outcome"), [("done", "done"), ("failed", "bad")])
def test_a_done_or_failed_folder_replaced_by_a_symlink_receives_nothing_outside_the_inbox(
    tree, tmp_path_factory, folder, outcome
):
    outside = tmp_path_factory.mktemp("outside")

    def swap(name: str) -> None:  # while the file trains, someone replaces the folder it will be filed into
        (tree.inbox / folder).rmdir()
        (tree.inbox / folder).symlink_to(outside)

    _drop(tree, "a.jsonl", '{"text": "a"}\n', arrived=1000)
    _daemon(tree, FakeTraining({"a.jsonl": [outcome]}, while_training=swap)).run()
    assert _names(outside) == []
    assert (tree.inbox / folder / "a.jsonl").exists() and not (tree.inbox / folder).is_symlink()
    assert (tree.inbox / "failed" / f"{folder}.not-a-folder").is_symlink()  # moved aside, then rejected


def test_a_name_too_long_for_its_error_file_is_failed_with_its_reason_and_the_next_file_trains(tree):
    long_name = "x" * 245 + ".jsonl"
    _drop(tree, long_name, "{nope\n", arrived=1000)
    _drop(tree, "b.jsonl", '{"text": "b"}\n', arrived=1001)
    training = FakeTraining({long_name: ["bad"]})
    assert _daemon(tree, training).run() == 0
    assert training.files == [long_name, "b.jsonl"]
    (reason,) = [p for p in (tree.inbox / "failed").iterdir() if p.name.endswith(".error.txt")]
    assert reason.name.startswith("x" * 200) and "no usable examples" in reason.read_text()
    assert long_name in _names(tree.inbox / "failed") and _names(tree.inbox / "processing") == []


def _unmovable(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Renaming an entry with one of these names fails, as on a folder the daemon may not write."""
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        if os.fsdecode(src).endswith(names):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)


def test_a_claimed_file_that_cannot_be_filed_away_is_left_for_later_and_the_next_file_trains(tree, monkeypatch):
    ledger, entry = _claimed_with_a_plan(tree)
    ledger.finish(entry.id, end_step=PLANNED_STEPS)
    _drop(tree, "b.jsonl", '{"text": "b"}\n', arrived=1000)
    _unmovable(monkeypatch, "a.jsonl")
    training = FakeTraining()
    assert _daemon(tree, training).run() == 0
    assert training.files == ["b.jsonl"]
    assert _names(tree.inbox / "processing") == ["a.jsonl"] and _names(tree.inbox / "done") == ["b.jsonl"]
    row = ledger.get(entry.id)
    assert row is not None and (row.state, row.filed_at) == (FileState.DONE, None)  # still the claim, filed later


def test_unmovable_entries_are_rejected_once_and_retried_later_without_spinning(tree, monkeypatch, caplog):
    os.mkfifo(tree.inbox / "x-fifo.jsonl")
    (tree.inbox / "processing").mkdir()
    os.mkfifo(tree.inbox / "processing" / "y-fifo.jsonl")
    _drop(tree, "b.jsonl", '{"text": "b"}\n', arrived=1000)
    _unmovable(monkeypatch, "x-fifo.jsonl", "y-fifo.jsonl")
    training = FakeTraining()
    daemon = _daemon(tree, training, once=False, rescan_seconds=0.05)
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        wait_for(lambda: training.files == ["b.jsonl"], timeout=10, what="b.jsonl to train")
        wait_for(lambda: caplog.text.count("y-fifo.jsonl: [Errno 13]") >= 2, timeout=10, what="a retry of y-fifo")
        wait_for(lambda: caplog.text.count("x-fifo.jsonl: [Errno 13]") >= 2, timeout=10, what="a retry of x-fifo")
    finally:
        daemon.stop.set()
        daemon.wake.set()
        thread.join(timeout=10)
    rejected = [e.name for e in Ledger(tree.status).entries(FileState.REJECTED)]
    assert sorted(rejected) == ["x-fifo.jsonl", "y-fifo.jsonl"]  # one row each, however often tried
    assert caplog.text.count("y-fifo.jsonl: [Errno 13]") <= 3  # 1 s, then 2 s, ...: no spinning


def test_names_with_control_characters_or_undecodable_bytes_train_and_are_logged_escaped(tree, caplog):
    caplog.set_level(logging.INFO)
    forged = "a.jsonl\nERROR forged line"
    latin1 = os.fsdecode(b"caf\xe9.jsonl")
    _drop(tree, forged, '{"text": "a"}\n', arrived=1000)
    _drop(tree, latin1, '{"text": "b"}\n', arrived=1001)
    training = FakeTraining({latin1: ["bad"]})
    assert _daemon(tree, training).run() == 0
    assert training.files == [forged, latin1]
    assert _names(tree.inbox / "done") == [forged]
    assert all("\n" not in r.getMessage() for r in caplog.records)
    assert "done: " in caplog.text and "a.jsonl\\x0aERROR forged line" in caplog.text
    assert "failed: caf\\xe9.jsonl" in caplog.text
    names = [e.name for e in Ledger(tree.status).entries()]
    assert names == ["a.jsonl\\x0aERROR forged line", "caf\\xe9.jsonl"]
    reason = (tree.inbox / "failed" / f"{latin1}.error.txt").read_text(encoding="utf-8")
    assert reason.startswith("caf\\xe9.jsonl failed at ")


class _CountingEvent(threading.Event):
    """A ``threading.Event`` that counts its ``set()`` calls: each one wakes the daemon's loop."""

    def __init__(self) -> None:
        super().__init__()
        self.sets = 0

    def set(self) -> None:
        self.sets += 1
        super().set()


def _count_calls(monkeypatch, obj: object, name: str) -> list[int]:
    """Count the calls of ``obj.name`` (one item appended per call)."""
    calls: list[int] = []
    original = getattr(obj, name)
    monkeypatch.setattr(obj, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_a_part_file_written_in_many_pieces_neither_wakes_the_loop_nor_rewrites_the_status(tree, monkeypatch):
    training = FakeTraining()
    daemon = _daemon(tree, training, once=False, rescan_seconds=3600)  # no periodic rescan meanwhile
    daemon.wake = wake = _CountingEvent()
    writes = _count_calls(monkeypatch, daemon.status, "update")
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        wait_for(lambda: training.spares_started, timeout=10, what="the loop to go idle")
        wakes_before, writes_before = wake.sets, len(writes)
        with open(tree.inbox / "big.jsonl.part", "wb") as f:  # a download in progress: 400 modify events
            for _ in range(400):
                f.write(b'{"text": "x"}\n' * 64)
                f.flush()
                os.fsync(f.fileno())
        # Events are handled in order: once a file renamed in after them has trained, every one was handled.
        (tree.root / "b.jsonl").write_text('{"text": "b"}\n')
        os.replace(tree.root / "b.jsonl", tree.inbox / "b.jsonl")
        wait_for(lambda: training.files == ["b.jsonl"], timeout=10, what="b.jsonl to train")
    finally:
        daemon.stop.set()
        daemon.wake.set()
        thread.join(timeout=10)
    # b's rename in and its claim; its queue while it trains and after
    assert wake.sets - wakes_before <= 4, wake.sets - wakes_before
    assert len(writes) - writes_before <= 4, len(writes) - writes_before


def test_an_idle_daemon_gives_its_spare_the_lines_flags(tree):
    """Idle, the spare may do the line's first work (a pretrained base's answers): it needs the flags a file gets."""
    training = FakeTraining()
    daemon = Daemon(
        DaemonArguments(inbox_dir=str(tree.inbox), status_dir=str(tree.status), output_dir=str(tree.output)),
        ["--max_seq_length", "64"],
        supervisor=training,
    )
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        wait_for(lambda: training.spares_started, timeout=10, what="the loop to go idle")
    finally:
        daemon.stop.set()
        daemon.wake.set()
        thread.join(timeout=10)
    folders = ["--output_dir", str(tree.output), "--status_dir", str(tree.status)]
    assert training.spares_started[0] is None  # no file trains
    assert training.spare_line_argv[0] == [*folders, "--max_seq_length", "64"]


def test_an_idle_daemon_rewrites_the_status_only_when_its_queue_changes(tree, monkeypatch):
    training = FakeTraining()
    daemon = _daemon(tree, training, once=False, rescan_seconds=0.01, settle_seconds=3600)  # a's never settles
    scans = _count_calls(monkeypatch, daemon.inbox, "scan")
    writes = _count_calls(monkeypatch, daemon.status, "update")
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        wait_for(lambda: len(scans) >= 20, timeout=10, what="20 rescans of an empty inbox")
        assert len(writes) == 2  # the start's state and the first (empty) queue
        (tree.inbox / "a.jsonl").write_text('{"text": "a"}\n')
        wait_for(lambda: _status(tree)["queue"] == ["a.jsonl"], timeout=10, what="a.jsonl in the queue")
        seen = len(scans)
        wait_for(lambda: len(scans) >= seen + 20, timeout=10, what="20 rescans with a.jsonl waiting")
        assert len(writes) == 3
    finally:
        daemon.stop.set()
        daemon.wake.set()
        thread.join(timeout=10)
    assert training.files == []


# ---------------------------------------------------------------- real daemons (subprocesses)


def test_a_file_renamed_into_the_inbox_is_taken_without_waiting_for_the_settle_time(tmp_path):
    """The watchdog events of a rename from a ``.part`` name and from another folder mark the file finished."""

    def complete(inbox: Inbox) -> set[str]:
        return {c.path.name for c in inbox.scan() if inbox.is_complete(c)}

    inbox = Inbox(tmp_path / "inbox", settle_seconds=30)
    wake = threading.Event()
    observer = new_observer()
    observer.schedule(Wake(inbox, wake), str(inbox.root), recursive=False)
    observer.start()
    try:
        (inbox.root / ".inside.jsonl.part").write_text('{"text": "a"}\n')
        os.replace(inbox.root / ".inside.jsonl.part", inbox.root / "inside.jsonl")
        (tmp_path / "outside.jsonl").write_text('{"text": "b"}\n')
        os.replace(tmp_path / "outside.jsonl", inbox.root / "outside.jsonl")
        (inbox.root / "in-place.jsonl").write_text('{"text": "c"}\n')  # written in place: it settles
        renamed = {"inside.jsonl", "outside.jsonl"}
        wait_for(lambda: complete(inbox) == renamed, 10, "the renamed files to count as complete")
        (in_place,) = [c for c in inbox.scan() if c.path.name == "in-place.jsonl"]
        assert not inbox.is_complete(in_place)
    finally:
        observer.stop()
        observer.join()


def test_daemon_once_drains_the_inbox_in_order_and_files_each_result(tree):
    docs = stdlib_documents(limit=24)
    write_jsonl(tree.inbox / "1-first.jsonl", [{"text": d} for d in docs[:12]])
    (tree.inbox / "2-bad.jsonl").write_bytes(b"{nope\n")
    write_jsonl(tree.inbox / "3-second.jsonl", [{"text": d} for d in docs[12:]])
    write_jsonl(tree.inbox / "4-writing.jsonl.part", [{"text": "not yet"}])
    for i, name in enumerate(["1-first.jsonl", "2-bad.jsonl", "3-second.jsonl"]):
        os.utime(tree.inbox / name, (1000 + i, 1000 + i))
    flags = tree.flags()
    result = run_cli(
        ["-m", "daemon", "--once", "--inbox_dir", str(tree.inbox), "--settle_seconds", "0", *flags], cwd=tree.root
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tree.inbox / "done").iterdir()) == ["1-first.jsonl", "3-second.jsonl"]
    assert sorted(p.name for p in (tree.inbox / "failed").iterdir()) == ["2-bad.jsonl", "2-bad.jsonl.error.txt"]
    assert "no usable examples" in (tree.inbox / "failed" / "2-bad.jsonl.error.txt").read_text()
    assert (tree.inbox / "4-writing.jsonl.part").exists()
    assert list((tree.inbox / "processing").iterdir()) == []
    rows = tree.history()
    assert [(r["file"], r["outcome"]) for r in rows] == [
        ("1-first.jsonl", "done"),
        ("2-bad.jsonl", "failed"),
        ("3-second.jsonl", "done"),
    ]
    assert rows[2]["start_step"] == rows[0]["end_step"]
    status = json.loads((tree.status / "training_status.json").read_text())
    assert status["files"]["done"] == 2 and status["files"]["failed"] == 1
    assert status["state"] == "idle" and status["global_step"] == rows[2]["end_step"]
    report = (tree.status / "report.html").read_text()  # drawn by the daemon, waited for before it exits
    assert "3-second.jsonl" in report and "no usable examples" in report
    summary = run_cli(["-m", "daemon", "status", "--status_dir", str(tree.status)], cwd=tree.root)
    assert "2 done, 1 failed" in summary.stdout
    assert f"global_step  {rows[2]['end_step']}" in summary.stdout


def test_a_second_daemon_on_the_same_output_dir_exits_with_a_clear_message(tree):
    from filelock import FileLock

    with FileLock(str(tree.output / ".daemon.lock")):
        result = run_cli(["-m", "daemon", "--once", *_dirs(tree)], cwd=tree.root)
    assert result.returncode == 1
    assert "another daemon is already training" in result.stderr


def test_daemon_rejects_a_bad_training_flag_before_touching_any_file(tree):
    write_jsonl(tree.inbox / "a.jsonl", [{"text": "x"}])
    result = run_cli(["-m", "daemon", "--once", *_dirs(tree), "--warmup_steps", "0.5"], cwd=tree.root)
    assert result.returncode == 1
    assert "--warmup_steps" in result.stderr
    assert (tree.inbox / "a.jsonl").exists()


def test_the_daemons_flags_and_its_config_file_mean_the_same_written_with_an_equals_sign(tmp_path):
    from daemon.service.cli import parse_daemon_args

    config = tmp_path / "daemon.yaml"
    config.write_text("inbox_dir: drops\nsettle_seconds: 3\nlearning_rate: 1.0e-4\n")
    spaced = parse_daemon_args(["--config", str(config), "--once", "--output_dir", "model", "--seed", "3"])
    equals = parse_daemon_args([f"--config={config}", "--once=True", "--output_dir=model", "--seed=3"])
    for args, _, train_argv in (spaced, equals):
        assert (args.inbox_dir, args.settle_seconds, args.once, args.output_dir) == ("drops", 3.0, True, "model")
        assert train_argv[:2] == ["--learning_rate", "0.0001"]  # the file's training flags go to every child
    assert spaced[2][2:] == ["--seed", "3"] and equals[2][2:] == ["--seed=3"]


def _dirs(tree) -> list[str]:
    return ["--inbox_dir", str(tree.inbox), "--status_dir", str(tree.status), "--output_dir", str(tree.output)]


def test_make_dataset_turns_a_folder_into_text_lines_and_skips_binaries(tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("print('a')\n")
    (src / "big.txt").write_text("line\n" * 100)
    (src / "blob.bin").write_bytes(b"\x00\x01\x02")
    (src / ".hidden").mkdir()
    (src / ".hidden" / "x.py").write_text("secret\n")
    out = tmp_path / "out.jsonl"
    result = run_cli(["-m", "daemon.make_dataset", str(src), str(out), "--max_chars", "100"], cwd=REPO)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(len(r["text"]) <= 100 for r in rows)
    assert "".join(r["text"] for r in rows[:-1]) == "line\n" * 100  # big.txt, split at line ends
    assert rows[-1]["text"] == "print('a')\n"
    assert "skipped 1 binary" in result.stdout


def test_the_daemon_process_imports_no_ml_library():
    """Start-up cost belongs to the training child (prestarted while idle), not to the daemon."""
    probe = (
        "import sys; from daemon import __main__; from daemon.service import watcher; "
        "print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))"
    )
    result = run_cli(["-c", probe], cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
