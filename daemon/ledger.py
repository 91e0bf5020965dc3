"""The ledger: one SQLite row per file the product has seen (SPEC section 9).

It lives in ``<status_dir>/ledger.sqlite`` (WAL mode, each change one
transaction) and is what makes a restart exact: a file's ``start_step`` and
``planned_steps`` are recorded before its first optimizer step, so after a
crash the same file resumes inside the same plan instead of planning again from
the latest checkpoint; a file whose content (sha256) is already ``done`` is not
trained again.

States: ``queued`` (claimed, not started), ``training`` (a plan is recorded),
``done``, ``failed``, ``duplicate`` (content already trained; skipped),
``rejected`` (not a regular file; never opened).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.status import utc_now

LEDGER_FILE = "ledger.sqlite"
STATES = ("queued", "training", "done", "failed", "duplicate", "rejected")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT NOT NULL,
    sha256        TEXT,
    size          INTEGER,
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    start_step    INTEGER,
    planned_steps INTEGER,
    end_step      INTEGER,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    finished_at   TEXT,
    error         TEXT
);
CREATE INDEX IF NOT EXISTS files_sha256 ON files (sha256);
CREATE INDEX IF NOT EXISTS files_state ON files (state);
"""


@dataclass(frozen=True)
class Entry:
    """One ledger row."""

    id: int
    name: str
    sha256: str | None
    size: int | None
    state: str
    attempts: int
    start_step: int | None
    planned_steps: int | None
    end_step: int | None
    created_at: str
    updated_at: str
    finished_at: str | None
    error: str | None


class Ledger:
    """Transactional access to ``<status_dir>/ledger.sqlite``.

    Each method opens its own short connection, so the daemon and its training
    child can both use the ledger (SQLite serialises writers; WAL lets readers
    go on during a write).

    Args:
        status_dir: the status folder (created if missing).
    """

    def __init__(self, status_dir: str | Path) -> None:
        self.path = Path(status_dir) / LEDGER_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._initialise()

    def _initialise(self, timeout: float = 30.0) -> None:
        # Outside a transaction: journal_mode cannot change inside one, and executescript commits.
        # Several processes (the ranks of a torchrun child) may open a new ledger at once; switching
        # to WAL then answers "locked" without waiting on the busy timeout, so retry for a while.
        deadline = time.monotonic() + timeout
        while True:
            db = sqlite3.connect(self.path, timeout=timeout)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
            finally:
                db.close()
            time.sleep(0.05)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def add(
        self, name: str, state: str, sha256: str | None = None, size: int | None = None, error: str | None = None
    ) -> Entry:
        """Record a newly seen file and return its row."""
        assert state in STATES, state
        now = utc_now()
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO files (name, sha256, size, state, created_at, updated_at, error) VALUES (?,?,?,?,?,?,?)",
                (name, sha256, size, state, now, now, error),
            )
            row = db.execute("SELECT * FROM files WHERE id = ?", (cur.lastrowid,)).fetchone()
        return Entry(**dict(row))

    def update(self, entry_id: int, **fields: Any) -> Entry:
        """Change fields of a row (``state`` is checked; ``updated_at`` is set)."""
        if "state" in fields:
            assert fields["state"] in STATES, fields["state"]
            if fields["state"] in ("done", "failed", "duplicate", "rejected"):
                fields.setdefault("finished_at", utc_now())
        fields["updated_at"] = utc_now()
        columns = ", ".join(f"{key} = ?" for key in fields)
        with self._connect() as db:
            db.execute(f"UPDATE files SET {columns} WHERE id = ?", (*fields.values(), entry_id))
            row = db.execute("SELECT * FROM files WHERE id = ?", (entry_id,)).fetchone()
        return Entry(**dict(row))

    def get(self, entry_id: int) -> Entry | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM files WHERE id = ?", (entry_id,)).fetchone()
        return Entry(**dict(row)) if row else None

    def find(self, sha256: str, states: tuple[str, ...] = STATES) -> Entry | None:
        """The newest row with this content hash in one of ``states``, or None."""
        marks = ",".join("?" * len(states))
        with self._connect() as db:
            row = db.execute(
                f"SELECT * FROM files WHERE sha256 = ? AND state IN ({marks}) ORDER BY id DESC LIMIT 1",
                (sha256, *states),
            ).fetchone()
        return Entry(**dict(row)) if row else None

    def find_claim(self, name: str, sha256: str) -> Entry | None:
        """The newest row of a claimed file: its name in ``processing/`` and its content hash."""
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM files WHERE name = ? AND sha256 = ? ORDER BY id DESC LIMIT 1", (name, sha256)
            ).fetchone()
        return Entry(**dict(row)) if row else None

    def entries(self, state: str | None = None) -> list[Entry]:
        """All rows (or those in ``state``), oldest first."""
        with self._connect() as db:
            if state is None:
                rows = db.execute("SELECT * FROM files ORDER BY id").fetchall()
            else:
                rows = db.execute("SELECT * FROM files WHERE state = ? ORDER BY id", (state,)).fetchall()
        return [Entry(**dict(r)) for r in rows]
