"""The daemon's events (docs/notifications.md): what happened, as JSON objects for the webhooks.

Each event is one JSON object (schema version :data:`SCHEMA_VERSION`)::

    schema_version, event, id, at, text, host, pid, status_dir, output_dir,
    global_step, state, file, history_row, ...fields of the event type

``event`` is one of

- ``file_done``, ``file_failed``, ``file_rolled_back``, ``file_reopened``: a row of
  ``status/history.jsonl``, whole in ``history_row``. A file the quality gate rolled back
  (``--on_regression rollback``: a ``failed`` row whose ``quality_gate.action`` is ``rollback``)
  is ``file_rolled_back`` with ``by: "quality_gate"``; a ``rolled_back`` row (``python -m daemon
  rollback``) is ``file_rolled_back`` with ``by: "hand"``.
- ``quality_gate_warning``: a done file whose gate said ``warn`` (it raised the loss on earlier
  slices beyond ``--max_regression``, or a slice could not be scored); ``quality_gate`` holds
  the gate's figures. It follows that file's ``file_done``.
- ``stalled``: a training process made no progress for ``--stall_timeout`` and was killed;
  ``attempt``, ``max_attempts``, ``stall_timeout``.
- ``daemon_started`` (its ``state`` is ``starting``) and ``daemon_stopped`` (``reason``).

``id`` is unique per event and the same across its retries (a receiver can drop repeats);
``text`` is one line for people (chat webhooks that read a ``text`` field show it as is).

Rows are found by :meth:`Events.poll`, which the daemon calls between files and while a file
trains: it reads the rows ``history.jsonl`` gained since the last call (whichever process
appended them: the training process, the daemon, a rollback) and remembers how many it has seen
in ``status/.notify_cursor.json``. So a rollback done by hand while the daemon was stopped (it
locks the folders the daemon holds) is announced when the daemon starts again; a status folder
that has no cursor yet starts at its end (turning webhooks on does not replay old files); a daemon started
without webhooks removes the cursor (:func:`forget_cursor`), so what it trains is not replayed when they are
turned on again. Standard library only.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.quality.forgetting import gate_message
from daemon.store.files import atomic_write_text, read_json_lines
from daemon.store.records import Outcome, utc_now
from daemon.store.status import HISTORY_FILE, StatusFile
from daemon.views.summary import duration, num

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CURSOR_FILE = ".notify_cursor.json"
EVENT_TYPES = (
    "file_done",
    "file_failed",
    "file_rolled_back",
    "file_reopened",
    "quality_gate_warning",
    "stalled",
    "daemon_started",
    "daemon_stopped",
)


class Events:
    """Builds the daemon's events and hands each to ``send`` (a :meth:`Notifier.send`: it never blocks).

    Args:
        send: called with each event.
        status_dir: the status folder (status document, history, the cursor).
        output_dir: the running model's folder (named in every event).
    """

    def __init__(self, send: Callable[[dict[str, Any]], None], status_dir: str | Path, output_dir: str | Path) -> None:
        self.send = send
        self.status = StatusFile(status_dir)
        self.history_path = self.status.dir / HISTORY_FILE
        self.cursor_path = self.status.dir / CURSOR_FILE
        self.output_dir = Path(output_dir)
        self._seen_size: int | None = None  # history.jsonl's size at the last read
        self._seen_rows = self._load_cursor()

    def emit(self, event: str, text: str, *, file: str | None = None, row: dict | None = None, **fields: Any) -> None:
        """Send one event of type ``event`` (one of :data:`EVENT_TYPES`) with its fields; never raises."""
        try:
            doc = self.status.read()
            self.send(
                {
                    "schema_version": SCHEMA_VERSION,
                    "event": event,
                    "id": uuid.uuid4().hex,
                    "at": utc_now(),
                    "text": text,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "status_dir": str(self.status.dir.absolute()),
                    "output_dir": str(self.output_dir.absolute()),
                    "global_step": doc.get("global_step"),
                    "state": doc.get("state"),
                    "file": file,
                    "history_row": row,
                    **fields,
                }
            )
        except Exception:  # an event is never worth the daemon: log it and go on
            logger.exception("could not build the %s event", event)

    def poll(self) -> None:
        """Send the events of the rows ``history.jsonl`` gained since the last call (cheap when none); never raises."""
        try:
            size = self.history_path.stat().st_size if self.history_path.exists() else 0
            if size == self._seen_size:
                return
            self._seen_size = size  # before reading: a history that cannot be read is logged once, not every poll
            rows = read_json_lines(self.history_path, warn=False)  # a line being appended now is read next time
            if len(rows) < self._seen_rows:  # a history replaced by a shorter one: go on from its end
                self._seen_rows = len(rows)
            first, new, self._seen_rows = self._seen_rows, rows[self._seen_rows :], len(rows)
            for number, row in enumerate(new, start=first + 1):
                self._announce(number, row)  # a row that cannot be announced does not take the rest with it
            if new:
                self._save_cursor()
        except Exception:
            logger.exception("could not read %s for notifications", self.history_path)

    def _announce(self, number: int, row: dict[str, Any]) -> None:
        """Send the events of ``row``, line ``number`` of the history; a row that cannot be read is logged (once)."""
        try:
            events = row_events(row)
        except Exception:
            logger.exception("%s line %d: no event sent for this row (not a history row)", self.history_path, number)
            return
        for event, text, fields in events:
            self.emit(event, text, file=row.get("file"), row=row, **fields)

    def stalled(self, file: str, attempt: int, max_attempts: int, stall_timeout: float) -> None:
        """A training process was killed for making no progress for ``stall_timeout`` seconds."""
        then = "it is tried again" if attempt < max_attempts else "it is failed"
        text = (
            f"{file}: no training progress for {stall_timeout:g} s: the training process was killed "
            f"(attempt {attempt} of {max_attempts}; {then})"
        )
        self.emit("stalled", text, file=file, attempt=attempt, max_attempts=max_attempts, stall_timeout=stall_timeout)

    def started(self) -> None:
        """The daemon started (its folders locked, its flags checked)."""
        try:
            step = self.status.read().get("global_step")
        except Exception:  # as emit(): an event is never worth the daemon
            logger.exception("could not read the status for the daemon_started event")
            step = None
        text = f"daemon started on {socket.gethostname()} (pid {os.getpid()}) at step {step}"
        self.emit("daemon_started", text, state="starting")

    def stopped(self, reason: str) -> None:
        """The daemon stops, for ``reason`` (one phrase)."""
        self.emit("daemon_stopped", f"daemon stopped on {socket.gethostname()}: {reason}", reason=reason)

    def _load_cursor(self) -> int:
        """Rows of ``history.jsonl`` already announced: the cursor's; with none, every row there now (saved)."""
        try:
            return int(json.loads(self.cursor_path.read_text(encoding="utf-8"))["history_rows"])
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, OSError):
            logger.warning("%s is unreadable: notifications go on from the end of the history", self.cursor_path)
        self._seen_rows = len(read_json_lines(self.history_path, warn=False))
        try:
            self._save_cursor()  # so that what is appended from now on is announced, even after a restart
        except OSError:
            logger.exception("could not write %s", self.cursor_path)
        return self._seen_rows

    def _save_cursor(self) -> None:
        atomic_write_text(self.cursor_path, json.dumps({"history_rows": self._seen_rows}) + "\n")


def forget_cursor(status_dir: str | Path) -> None:
    """Remove the webhooks' cursor: a daemon runs without webhooks, and the next one with them starts at the end of
    the history, as on a folder that never had them (what was trained meanwhile is not announced). A cursor
    that cannot be removed is logged, not raised: the daemon runs without webhooks either way."""
    try:
        (Path(status_dir) / CURSOR_FILE).unlink(missing_ok=True)
    except OSError:
        logger.exception("could not remove %s", Path(status_dir) / CURSOR_FILE)


def row_events(row: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """The events of one ``history.jsonl`` row: ``(event, text, fields)`` each (module docstring)."""
    name, outcome, error = row.get("file"), row.get("outcome"), row.get("error")
    gate = row.get("quality_gate") or {}
    if outcome == Outcome.DONE:
        text = (
            f"{name}: done, steps {row.get('start_step')} -> {row.get('end_step')}, "
            f"train_loss {num(row.get('train_loss'), '.3f')}, eval_loss {num(row.get('eval_loss'), '.3f')}, "
            f"{duration(row.get('wall_seconds'))}"
        )
        events: list[tuple[str, str, dict[str, Any]]] = [("file_done", text, {})]
        if gate.get("action") == "warn":
            try:
                warning = f"{name}: {gate_message(gate, row.get('start_step') or 0)}"
            except (KeyError, TypeError, ValueError, AttributeError):  # a gate row without all its figures
                warning = f"{name}: the quality gate warned (its figures: quality_gate)"
            events.append(("quality_gate_warning", warning, {"quality_gate": gate}))
        return events
    if outcome == Outcome.FAILED and gate.get("action") == "rollback":
        return [("file_rolled_back", f"{name}: rolled back by the quality gate: {error}", {"by": "quality_gate"})]
    if outcome == Outcome.FAILED:
        return [("file_failed", f"{name}: failed: {error}", {})]
    if outcome == Outcome.ROLLED_BACK:
        return [("file_rolled_back", f"{name}: {error} (python -m daemon rollback)", {"by": "hand"})]
    if outcome == Outcome.REOPENED:
        return [("file_reopened", f"{name}: reopened to train its missing steps again: {error}", {})]
    return []
