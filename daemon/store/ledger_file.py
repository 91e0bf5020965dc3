"""The ledger's SQLite file: its schema, its instance id, and one short transaction at a time.

:class:`LedgerFile` is what :class:`~daemon.store.ledger.Ledger` (the rows and their state
transitions) is built on. Each transaction opens its own short connection, so the daemon and its
training child can both use the file (SQLite serialises writers; WAL lets readers go on during a
write). Every transaction checks that the file is still the one this object opened: a ledger deleted
or replaced while in use would hand out another file's row ids (:class:`LedgerReplaced`).
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from daemon.exceptions import LedgerReplaced
from daemon.store.failures import LEDGER_BUSY_SECONDS, ledger_fault

LEDGER_FILE = "ledger.sqlite"
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
    error         TEXT,
    filed_at      TEXT,
    replayed_examples INTEGER
);
CREATE INDEX IF NOT EXISTS files_sha256 ON files (sha256);
CREATE INDEX IF NOT EXISTS files_state ON files (state);
CREATE INDEX IF NOT EXISTS files_name ON files (name);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_INSTANCE = "SELECT value FROM meta WHERE key = 'instance'"


class LedgerFile:
    """``<status_dir>/ledger.sqlite``, created with its schema if missing.

    Args:
        status_dir: the status folder (created if missing).
        instance: the instance id the ledger must have (a training child gets its
            daemon's); None opens or creates whatever ledger is there.

    Attributes:
        path: the SQLite file.
        instance: the random id of the ledger file this object reads and writes.

    Raises:
        LedgerReplaced: ``instance`` is given and the ledger is missing or another one.
        LedgerError: the file is damaged, stays locked, or cannot be written.
    """

    def __init__(self, status_dir: str | Path, instance: str | None = None) -> None:
        self.path = Path(status_dir) / LEDGER_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if instance is not None and not self.path.exists():
            raise LedgerReplaced(f"{self.path} is missing: the daemon's ledger was deleted while it ran")
        self.instance = self._initialise()
        if instance is not None and instance != self.instance:
            raise LedgerReplaced(f"{self.path} is not the daemon's ledger any more: it was replaced while it ran")

    def _initialise(self, timeout: float = LEDGER_BUSY_SECONDS) -> str:
        """Create the schema (and the instance id) if missing; returns the ledger's instance id.

        Raises:
            LedgerError: the file is damaged, stays locked for ``timeout`` seconds, or cannot be written.
        """
        try:
            return self._create_schema(timeout)
        except sqlite3.Error as e:
            if (fault := ledger_fault(self.path, e)) is None:
                raise
            raise fault from e

    def _create_schema(self, timeout: float) -> str:
        # Outside a transaction: journal_mode cannot change inside one, and executescript commits.
        # Several processes (the ranks of a torchrun child) may open a new ledger at once; switching
        # to WAL then answers "locked" without waiting on the busy timeout, so retry for a while.
        deadline = time.monotonic() + timeout
        while True:
            db = sqlite3.connect(self.path, timeout=timeout)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
                columns = {row[1] for row in db.execute("PRAGMA table_info(files)")}
                if "filed_at" not in columns:  # a ledger written before filed_at existed
                    db.execute("ALTER TABLE files ADD COLUMN filed_at TEXT")
                if "replayed_examples" not in columns:  # a ledger written before replay existed
                    db.execute("ALTER TABLE files ADD COLUMN replayed_examples INTEGER")
                with db:  # of two processes creating the ledger at once, the first id wins for both
                    db.execute("INSERT OR IGNORE INTO meta VALUES ('instance', ?)", (uuid.uuid4().hex,))
                return str(db.execute(_INSTANCE).fetchone()[0])
            except sqlite3.OperationalError as e:
                # "duplicate column": another process added filed_at first; go round again.
                if ("locked" not in str(e) and "duplicate column" not in str(e)) or time.monotonic() > deadline:
                    raise
            finally:
                db.close()
            time.sleep(0.05)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One transaction on this ledger's file; never creates the file.

        Raises:
            LedgerReplaced: the file was deleted, or replaced by another ledger.
        """
        gone = LedgerReplaced(
            f"{self.path} was deleted or replaced while in use, so its row ids may name other files now; "
            "stopping rather than reading or writing the wrong rows (restart to use the ledger that is there)"
        )
        uri = f"{self.path.absolute().as_uri()}?mode=rw"
        try:  # mode=rw: a deleted ledger is an error here, not an empty new one
            db = sqlite3.connect(uri, timeout=LEDGER_BUSY_SECONDS, isolation_level=None, uri=True)
        except sqlite3.OperationalError as e:
            if self.path.exists() and (fault := ledger_fault(self.path, e)) is not None:
                raise fault from e
            raise gone from e
        db.row_factory = sqlite3.Row
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(_INSTANCE).fetchone()
            except sqlite3.OperationalError as e:  # no meta table: another ledger, or an emptied file
                raise (ledger_fault(self.path, e) or gone) from e
            if row is None or row[0] != self.instance:
                raise gone
            yield db
            db.execute("COMMIT")
        except sqlite3.Error as e:
            _roll_back_quietly(db)
            if (fault := ledger_fault(self.path, e)) is None:
                raise
            raise fault from e
        except BaseException:
            _roll_back_quietly(db)
            raise
        finally:
            db.close()


def _roll_back_quietly(db: sqlite3.Connection) -> None:
    """End an open transaction after a failure; a damaged or unwritable file may refuse that too."""
    try:
        if db.in_transaction:
            db.execute("ROLLBACK")
    except sqlite3.Error:
        pass
