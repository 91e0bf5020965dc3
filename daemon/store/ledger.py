"""The ledger: one SQLite row per file the product has seen (docs/operating.md).

It lives in ``<status_dir>/ledger.sqlite`` (WAL mode, each change one
transaction) and is what makes a restart exact: a file's ``start_step`` and
``planned_steps`` are recorded before its first optimizer step, so after a
crash the same file resumes inside the same plan instead of planning again from
the latest checkpoint; a file whose content (sha256) is already ``done`` is not
trained again.

States (:class:`~daemon.store.records.FileState`) and who moves a row between them; each
transition is one method of :class:`Ledger`, and :data:`TRANSITIONS` is checked on
every write:

=============  ===========  ===========================  =============================
from           to           method                       written by
=============  ===========  ===========================  =============================
(new row)      queued       :meth:`Ledger.add`           daemon claim; ``train.py``
(new row)      duplicate    :meth:`Ledger.add`           daemon (content already done)
(new row)      rejected     :meth:`Ledger.add`           daemon (not a regular file)
queued         training     :meth:`Ledger.record_plan`   training process
training       done         :meth:`Ledger.finish`        training process
queued         failed       :meth:`Ledger.fail`          training process; daemon
training       failed       :meth:`Ledger.fail`          training process; daemon
done           rolled_back  :meth:`Ledger.roll_back`     ``python -m daemon rollback``
done           training     :meth:`Ledger.reopen`        daemon (:mod:`daemon.store.reconcile`)
=============  ===========  ===========================  =============================

A reopened row keeps its plan and its ``end_step``: the latest usable checkpoint lacks the
file's last steps, which its next run trains again; ``training`` with an ``end_step`` is how
such a row is told from a first run.

A ``rolled_back`` row keeps its plan and ``end_step`` (the steps it had added) and its
``finished_at``; ``error`` says to which step it was rolled back. Its content is no
longer in the model, so dropping the file again trains it again.

``attempts`` (crashed or stalled training processes) is counted by the daemon with
:meth:`Ledger.count_attempt`, which changes no state.

``filed_at`` is when the daemon moved the file out of ``processing/`` (or the drop
zone) into ``done/`` or ``failed/``: :meth:`Ledger.mark_filed`, after the move, and
:meth:`Ledger.mark_filed_unless_claimed` at start-up for a finished row whose file
is no longer in ``processing/`` (the daemon stopped between the two). Neither
changes the state. Only a row not yet filed away is the claim of a file in
``processing/`` (:meth:`Ledger.find_claim`): a file dropped again under the same
name, with the same content, is a new claim with a new row.

Names are stored as :func:`~daemon.names.printable` text, so any file name can be
stored and looked up.

Row ids are only meaningful within one ledger file: a ``ledger.sqlite`` deleted
while the daemon runs would restart them at 1 and hand the daemon, or its child's
``--ledger_id``, another file's row. So each ledger holds a random *instance* id
(table ``meta``), every transaction checks that it is still the one this
:class:`Ledger` opened, a ledger in use is never re-created, and the daemon hands
its instance to its training children (:data:`~daemon.config.LEDGER_ENV`), which
refuse any other ledger. A mismatch raises :class:`LedgerReplaced`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from daemon.names import printable
from daemon.store.ledger_file import LedgerFile
from daemon.store.records import FileState, utc_now

# Allowed state changes of a row; None is a row not yet written.
TRANSITIONS: dict[FileState | None, frozenset[FileState]] = {
    None: frozenset({FileState.QUEUED, FileState.DUPLICATE, FileState.REJECTED}),
    FileState.QUEUED: frozenset({FileState.TRAINING, FileState.FAILED}),
    FileState.TRAINING: frozenset({FileState.DONE, FileState.FAILED}),
    FileState.DONE: frozenset({FileState.ROLLED_BACK, FileState.TRAINING}),
    FileState.FAILED: frozenset(),
    FileState.DUPLICATE: frozenset(),
    FileState.REJECTED: frozenset(),
    FileState.ROLLED_BACK: frozenset(),
}


@dataclass(frozen=True)
class LedgerRow:
    """One ledger row."""

    id: int
    name: str
    sha256: str | None
    size: int | None
    state: FileState
    attempts: int
    start_step: int | None
    planned_steps: int | None
    end_step: int | None
    created_at: str
    updated_at: str
    finished_at: str | None
    error: str | None
    filed_at: str | None = None
    replayed_examples: int | None = None


class Ledger(LedgerFile):
    """The rows of ``<status_dir>/ledger.sqlite`` and their state transitions, each its own transaction.

    The file, its schema and the check that it is still the same ledger are
    :class:`~daemon.store.ledger_file.LedgerFile`'s.

    Args:
        status_dir: the status folder (created if missing).
        instance: the instance id the ledger must have (a training child gets its
            daemon's); None opens or creates whatever ledger is there.

    Attributes:
        instance: the random id of the ledger file this object reads and writes.

    Raises:
        LedgerReplaced: ``instance`` is given and the ledger is missing or another one.
    """

    def add(
        self,
        name: str,
        state: FileState,
        sha256: str | None = None,
        size: int | None = None,
        error: str | None = None,
    ) -> LedgerRow:
        """Record a newly seen file (``queued``, ``duplicate`` or ``rejected``) and return its row.

        Args:
            name: the file's name (stored :func:`~daemon.names.printable`).
            state: the new row's state.
            sha256: the content hash, None for an entry rejected unopened.
            size: bytes.
            error: why a ``duplicate`` or ``rejected`` entry is not trained.

        Returns:
            The new row.
        """
        state = FileState(state)
        assert state in TRANSITIONS[None], state
        now = utc_now()
        finished_at = now if state.finished else None
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO files (name, sha256, size, state, created_at, updated_at, finished_at, error) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (printable(name), sha256, size, str(state), now, now, finished_at, error),
            )
            row = db.execute("SELECT * FROM files WHERE id = ?", (cur.lastrowid,)).fetchone()
        return _entry(row)

    def record_plan(self, entry_id: int, start_step: int, planned_steps: int, replayed_examples: int = 0) -> LedgerRow:
        """``queued -> training``: the file's plan, written before its first optimizer step.

        ``planned_steps`` counts the file's own and its ``replayed_examples`` (:mod:`daemon.store.replay`).
        """
        return self.update(
            entry_id,
            state=FileState.TRAINING,
            start_step=start_step,
            planned_steps=planned_steps,
            replayed_examples=replayed_examples,
        )

    def finish(self, entry_id: int, end_step: int) -> LedgerRow:
        """``training -> done``: the file is trained, exported and recorded in the history."""
        return self.update(entry_id, state=FileState.DONE, end_step=end_step)

    def reopen(self, entry_id: int, error: str) -> LedgerRow:
        """``done -> training``: the file's last steps are missing from the model and train again.

        The plan and ``end_step`` stay (the step its run must reach again); ``error`` says why.
        """
        return self.update(entry_id, state=FileState.TRAINING, error=error)

    def fail(self, entry_id: int, error: str) -> LedgerRow:
        """``queued | training -> failed``, with the reason shown to the user."""
        return self.update(entry_id, state=FileState.FAILED, error=error)

    def roll_back(self, entry_ids: Iterable[int], to_step: int) -> list[LedgerRow]:
        """``done -> rolled_back`` for each of ``entry_ids``, in one transaction: all of them or none.

        A row already ``rolled_back`` is left as it is, so a rollback finished again after a
        kill changes nothing more. ``finished_at`` stays when the file finished training.

        Args:
            entry_ids: the rows of the done files whose steps the rollback removes.
            to_step: the ``global_step`` the model was rolled back to (written into ``error``).

        Returns:
            The rows as written.

        Raises:
            ValueError: a row is missing, or in another state than ``done`` or ``rolled_back``
                (nothing is changed then).
        """
        ids = list(entry_ids)
        with self._connect() as db:
            for entry_id in ids:
                old = db.execute("SELECT state FROM files WHERE id = ?", (entry_id,)).fetchone()
                if old is None:
                    raise ValueError(f"ledger row {entry_id} does not exist")
                if old["state"] == FileState.ROLLED_BACK:
                    continue
                if FileState.ROLLED_BACK not in TRANSITIONS[FileState(old["state"])]:
                    raise ValueError(f"ledger row {entry_id}: {old['state']} -> rolled_back is not allowed")
                db.execute(
                    "UPDATE files SET state = ?, error = ?, updated_at = ? WHERE id = ?",
                    (str(FileState.ROLLED_BACK), f"rolled back to step {to_step}", utc_now(), entry_id),
                )
            rows = [db.execute("SELECT * FROM files WHERE id = ?", (i,)).fetchone() for i in ids]
        return [_entry(row) for row in rows]

    def mark_filed(self, entry_id: int) -> LedgerRow:
        """The file has been moved into ``done/`` or ``failed/``: its row is no longer a claim (no state change)."""
        return self.update(entry_id, filed_at=utc_now())

    def mark_filed_unless_claimed(self, claimed: Iterable[str]) -> int:
        """Mark filed every finished, unfiled row whose file is not among the ``claimed`` names (no state change).

        Run by the daemon at start-up: such a file was filed away just before the
        daemon stopped, or the row predates ``filed_at``.

        Args:
            claimed: the names of the entries in ``processing/``.

        Returns:
            How many rows were marked.
        """
        names = [printable(name) for name in claimed]
        finished = [str(state) for state in FileState if state.finished]
        with self._connect() as db:
            cur = db.execute(
                f"UPDATE files SET filed_at = ?, updated_at = ? WHERE filed_at IS NULL "
                f"AND state IN ({','.join('?' * len(finished))}) AND name NOT IN ({','.join('?' * len(names))})",
                (utc_now(), utc_now(), *finished, *names),
            )
        return cur.rowcount

    def count_attempt(self, entry_id: int, error: str) -> LedgerRow:
        """One more crashed or stalled training attempt (no state change)."""
        with self._connect() as db:
            db.execute(
                "UPDATE files SET attempts = attempts + 1, error = ?, updated_at = ? WHERE id = ?",
                (error, utc_now(), entry_id),
            )
            row = db.execute("SELECT * FROM files WHERE id = ?", (entry_id,)).fetchone()
        return _entry(row)

    def update(self, entry_id: int, **fields: Any) -> LedgerRow:
        """Change fields of a row in one transaction; a ``state`` change must be in :data:`TRANSITIONS`.

        Raises:
            ValueError: the row does not exist, or the state change is not allowed
                (the row is left unchanged).
        """
        if "state" in fields:
            fields["state"] = str(FileState(fields["state"]))
            if FileState(fields["state"]).finished:
                fields.setdefault("finished_at", utc_now())
        fields["updated_at"] = utc_now()
        columns = ", ".join(f"{key} = ?" for key in fields)
        with self._connect() as db:
            old = db.execute("SELECT state FROM files WHERE id = ?", (entry_id,)).fetchone()
            if old is None:
                raise ValueError(f"ledger row {entry_id} does not exist")
            if "state" in fields and fields["state"] != old["state"]:
                allowed = TRANSITIONS[FileState(old["state"])]
                if FileState(fields["state"]) not in allowed:
                    raise ValueError(f"ledger row {entry_id}: {old['state']} -> {fields['state']} is not allowed")
            db.execute(f"UPDATE files SET {columns} WHERE id = ?", (*fields.values(), entry_id))
            row = db.execute("SELECT * FROM files WHERE id = ?", (entry_id,)).fetchone()
        return _entry(row)

    def get(self, entry_id: int) -> LedgerRow | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM files WHERE id = ?", (entry_id,)).fetchone()
        return _entry(row) if row else None

    def find(self, sha256: str, states: tuple[FileState, ...] = tuple(FileState)) -> LedgerRow | None:
        """The newest row with this content hash in one of ``states``, or None."""
        marks = ",".join("?" * len(states))
        with self._connect() as db:
            row = db.execute(
                f"SELECT * FROM files WHERE sha256 = ? AND state IN ({marks}) ORDER BY id DESC LIMIT 1",
                (sha256, *map(str, states)),
            ).fetchone()
        return _entry(row) if row else None

    def find_claim(self, name: str, sha256: str | None) -> LedgerRow | None:
        """The row of a file not yet filed away, by its name and content hash.

        Args:
            name: its name in ``processing/`` (or in the drop zone, for a rejected entry).
            sha256: its content hash; None finds an entry rejected unopened.

        Returns:
            The newest such row, or None: rows of files already filed away never match.
        """
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM files WHERE name = ? AND sha256 IS ? AND filed_at IS NULL ORDER BY id DESC LIMIT 1",
                (printable(name), sha256),
            ).fetchone()
        return _entry(row) if row else None

    def entries(self, state: FileState | None = None) -> list[LedgerRow]:
        """All rows (or those in ``state``), oldest first."""
        with self._connect() as db:
            if state is None:
                rows = db.execute("SELECT * FROM files ORDER BY id").fetchall()
            else:
                rows = db.execute("SELECT * FROM files WHERE state = ? ORDER BY id", (str(state),)).fetchall()
        return [_entry(r) for r in rows]


def _entry(row: sqlite3.Row) -> LedgerRow:
    fields = dict(row)
    fields["state"] = FileState(fields["state"])
    return LedgerRow(**fields)
