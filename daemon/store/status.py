"""``status/training_status.json``, ``status/history.jsonl``, ``status/loss.jsonl`` and the heartbeat.

docs/guarantees.md "Folders and files" lists them.

Two processes write the status document: the training run (progress, metrics)
and the daemon (queue, between files). Each write is a read-modify-write of the
fields the writer owns, under a ``filelock`` lock, and lands by ``os.replace``
of a temporary file in the same folder, so a reader never sees a torn document
and no writer loses the other's fields. Imports only the standard library and
``filelock``: the daemon process uses it without torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from daemon.store.files import append_json_lines, atomic_write_text, read_json_lines
from daemon.store.records import HistoryRow, Outcome, RunState, utc_now

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# The status fields each evolution snapshot keeps of its file's evaluation (FileEvaluation.status_fields writes them).
SNAPSHOT_FIGURES = ("forgetting", "quality_gate", "evaluation", "forward_transfer")
STATUS_FILE = "training_status.json"
HISTORY_FILE = "history.jsonl"
LOSS_FILE = "loss.jsonl"


# Seconds between two progress lines of a long phase (PhaseProgress).
PROGRESS_EVERY_SECONDS = 10.0

# The last moment this process made progress (time.time()); see mark_progress.
_progress_at: float | None = None


def mark_progress() -> None:
    """Record that this process is making progress now; the heartbeat writes it as ``progress_at``.

    Cheap (one float assignment), so long phases call it as they go: the scan per line
    batch, tokenization per map batch, evaluation per step, sampling per prompt. The
    daemon's stall detection reads ``progress_at``: a phase that works never looks
    stalled, and a hung one stops marking even while the heartbeat thread lives.
    """
    global _progress_at
    _progress_at = time.time()


class PhaseProgress:
    """Log lines that show a long phase moving: ``"{phase}: {done} of {total} {unit} ({pct}%), {rate} {unit}/s"``.

    A line at most every :data:`PROGRESS_EVERY_SECONDS` (10 s), the first once the phase
    has run that long, so a phase of a small file prints nothing and one of a 10 GB file
    a line every 10 s (the progress bars of ``datasets`` are off when stderr is a log
    file or a pipe). Each :meth:`advance` also calls :func:`mark_progress`.

    Args:
        phase: what is being done, e.g. ``"scanning big.jsonl"``.
        total: the amount of the whole phase, in ``unit`` (a file's bytes, its records).
        unit: the unit's name in the line; ``"MB"`` counts bytes and shows them in MiB.
    """

    def __init__(self, phase: str, total: int, unit: str) -> None:
        self.phase, self.total, self.unit, self.every = phase, total, unit, PROGRESS_EVERY_SECONDS
        self.done = 0
        self.started = self.last = time.monotonic()

    def advance(self, amount: int) -> None:
        """Count ``amount`` more units done; log a line when ``every`` seconds have passed since the last."""
        mark_progress()
        self.done += amount
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        scale, digits = (1024 * 1024, 1) if self.unit == "MB" else (1, 0)
        done, total = self.done / scale, self.total / scale
        rate = done / max(now - self.started, 1e-9)
        so_far = f"{done:,.{digits}f} of {total:,.{digits}f} {self.unit}"
        percent = 100 * self.done / max(self.total, 1)
        logger.info("%s: %s (%.0f%%), %s %s/s", self.phase, so_far, percent, f"{rate:,.{digits}f}", self.unit)


def perplexity(eval_loss: float | None) -> float | None:
    """``exp(eval_loss)`` (mean token cross-entropy in nats), None when there is no loss, inf on overflow."""
    if eval_loss is None:
        return None
    try:
        return math.exp(eval_loss)
    except OverflowError:
        return float("inf")


def empty_status() -> dict[str, Any]:
    """A status document with every field the README lists, nothing known yet."""
    return {
        "schema_version": SCHEMA_VERSION,
        "state": RunState.IDLE,
        "updated_at": utc_now(),
        "pid": os.getpid(),
        "global_step": 0,
        "max_steps": 0,
        "current_file": None,
        "metrics": {"loss": None, "learning_rate": None, "grad_norm": None, "tokens_per_second": None},
        "total_evals": 0,
        "last_eval": None,
        "files": {"queued": 0, "done": 0, "failed": 0},
        "queue": [],
        "gradient_guard": {"workers": 0, "dropped_shards": 0, "skipped_steps": 0, "last_grad_norm": None},
        "last_error": None,
        "disk": None,
        "checkpoints": None,
        "evaluation": None,
        "forgetting": None,
        "quality_gate": None,
    }


class StatusFile:
    """Read-modify-write access to ``<status_dir>/training_status.json``.

    Args:
        status_dir: the status folder; created if missing.
    """

    def __init__(self, status_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(status_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / STATUS_FILE
        self._lock = FileLock(str(self.dir / f".{STATUS_FILE}.lock"))

    def read(self) -> dict[str, Any]:
        """The current document merged over :func:`empty_status` (so every field is present)."""
        doc = empty_status()
        try:
            doc.update(json.loads(self.path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            pass
        except ValueError:
            logger.warning("%s is not valid JSON; starting a fresh status document", self.path)
        return doc

    def update(self, mutate: Callable[[dict[str, Any]], None] | None = None, /, **fields: Any) -> dict[str, Any]:
        """Set top-level ``fields`` and/or apply ``mutate(doc)``, then write atomically.

        Returns:
            The document as written.
        """
        with self._lock:
            doc = self.read()
            doc.update(fields)
            if mutate is not None:
                mutate(doc)
            doc["updated_at"] = utc_now()
            doc["pid"] = os.getpid()
            atomic_write_text(self.path, json.dumps(doc, indent=2, sort_keys=False) + "\n")
            return doc

    def record_eval(self, step: int, file: str, eval_loss: float) -> None:
        """Count one held-out evaluation and make it ``last_eval`` (loss in nats)."""

        def count(doc: dict[str, Any]) -> None:
            doc["total_evals"] = doc.get("total_evals", 0) + 1
            doc["last_eval"] = last_eval(step, file, eval_loss)

        self.update(count)

    def record_outcome(self, row: HistoryRow) -> None:
        """Append a finished or failed file's row to ``history.jsonl`` and count it in the status.

        The one place where a file's outcome is recorded, so the history and the
        ``files`` counters never disagree.

        A ``done`` row is appended once: the same content (sha256) done from the
        same start step again is not repeated while that row stands (is not rolled
        back or reopened), so a run that is finished a second time after a crash keeps the
        history exact. A ``rolled_back`` or ``reopened`` row is appended only while the done
        row it cancels stands, so one written again after a kill adds nothing either.

        Args:
            row: the history row. A failed row's ``error`` becomes the status's ``last_error``.
        """
        with self._lock:
            if row.outcome != Outcome.FAILED:
                key = (row.sha256, row.start_step)
                rows = standing_done_rows(read_history(self.dir))
                standing = any((o["sha256"], o["start_step"]) == key for o in rows)
                # A run killed after this append but before the ledger said "done" finishes again;
                # a rollback killed after this append finishes again (nothing left to cancel).
                if standing if row.outcome == Outcome.DONE else not standing:
                    logger.info("history already has %s %s from step %s", row.outcome, row.file, row.start_step)
                    return
            append_json_lines(self.dir / HISTORY_FILE, [row.as_dict()], durable=True)

        def count(doc: dict[str, Any]) -> None:
            if row.outcome != Outcome.REOPENED:  # a reopened file is counted when it is done again
                doc["files"][row.outcome] = doc["files"].get(row.outcome, 0) + 1
            if row.outcome.cancels_done:
                doc["files"]["done"] = max(0, doc["files"].get("done", 0) - 1)
            if row.outcome == Outcome.FAILED:
                doc["last_error"] = {"file": row.file, "message": row.error, "at": row.finished_at}

        self.update(count)


def standing_done_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``done`` rows (oldest first) of history ``rows`` whose steps no rollback took out of the model.

    A ``rolled_back`` or ``reopened`` row cancels the latest earlier done row with its ``sha256``
    and ``start_step``; the same file trained again after it has a new done row, which stands.
    """
    standing: list[dict[str, Any]] = []
    for row in rows:
        if row.get("outcome") == Outcome.DONE:
            standing.append(row)
        elif row.get("outcome") in (Outcome.ROLLED_BACK, Outcome.REOPENED):
            key = (row.get("sha256"), row.get("start_step"))
            match = [i for i, old in enumerate(standing) if (old.get("sha256"), old.get("start_step")) == key]
            if match:
                del standing[match[-1]]
    return standing


def history_violations(rows: list[dict[str, Any]]) -> list[str]:
    """Check the step invariant (docs/data.md, step accounting) over ``history.jsonl`` rows.

    Over the standing done rows (:func:`standing_done_rows`: rolled-back steps never count),
    ``end_step - start_step == planned_steps > 0``, and each starts where the previous one ended.

    Returns:
        One message per violation (empty when the history is consistent).
    """
    problems = []
    previous_end: int | None = None
    for row in standing_done_rows(rows):
        name, start, end, planned = row["file"], row["start_step"], row["end_step"], row["planned_steps"]
        if not planned or planned <= 0:
            problems.append(f"{name}: done with {planned} planned steps")
        if end - start != planned:
            problems.append(f"{name}: trained {end - start} steps ({start} -> {end}), planned {planned}")
        if previous_end is not None and start != previous_end:
            problems.append(f"{name}: starts at step {start}, the previous file ended at {previous_end}")
        previous_end = end
    return problems


def read_history(status_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All rows of ``<status_dir>/history.jsonl``, oldest first (empty if none).

    A line torn by a kill in the middle of an append is skipped with a warning
    (its file finishes again on restart and is appended whole).
    """
    return read_json_lines(Path(status_dir) / HISTORY_FILE)


def append_loss_points(status_dir: str | os.PathLike[str], points: list[dict[str, Any]]) -> None:
    """Append training-loss points to ``<status_dir>/loss.jsonl``, one JSON line each.

    A point is one logging step (``--logging_steps``) of the Trainer: ``step`` (``global_step``),
    ``file``, ``loss`` (nats, mean over the steps since the previous point), ``learning_rate``,
    ``grad_norm`` and ``tokens_per_second`` (this file's rate so far). Not fsynced: a point lost
    to a power cut is only a gap in a plot.
    """
    append_json_lines(Path(status_dir) / LOSS_FILE, points)


def read_loss_series(status_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The running model's training-loss points from ``loss.jsonl``, in step order.

    A point whose step is not above the previous one means the model went back (a resume
    from an earlier checkpoint, a failed file, a rollback) and trained those steps again:
    the points it replaces are dropped, as TensorBoard purges a restarted run. Torn or
    unreadable lines are skipped.
    """
    series: list[dict[str, Any]] = []
    for point in read_json_lines(Path(status_dir) / LOSS_FILE, warn=False):
        try:
            step = int(point["step"])
        except (ValueError, TypeError, KeyError):
            continue
        while series and series[-1]["step"] >= step:
            series.pop()
        series.append(point)
    return series


class Heartbeat(threading.Thread):
    """Writes the live progress into the status file every ``interval`` seconds.

    The training loop only updates an in-memory dict (:meth:`set`); this thread
    does the file I/O, so no status write sits in the hot path. Each write sets
    the fields given to :meth:`set` so far, so only fields the training run owns
    (state, steps, current file, metrics, gradient guard) may be set here; the
    outcome counters and ``last_error`` go through :meth:`StatusFile.record_outcome`. Stop it with
    :meth:`stop`, which writes one last time and joins.

    Args:
        status: the status file.
        interval: seconds between writes.
    """

    def __init__(self, status: StatusFile, interval: float) -> None:
        super().__init__(name="status-heartbeat", daemon=True)
        self.status = status
        self.interval = interval
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._fields: dict[str, Any] = {}
        self._loss_points: list[dict[str, Any]] = []

    def set(self, **fields: Any) -> None:
        """Replace top-level fields of the next write (cheap; no I/O)."""
        with self._lock:
            self._fields.update(fields)

    def add_loss_point(self, point: dict[str, Any]) -> None:
        """Queue one logging step's point for ``loss.jsonl`` (cheap; the next write appends it)."""
        with self._lock:
            self._loss_points.append(point)

    def flush(self) -> None:
        """Write the pending fields now, with the latest :func:`mark_progress` (also ``updated_at``),
        and append the queued loss points to ``loss.jsonl``."""
        with self._lock:
            if _progress_at is not None and _progress_at > self._fields.get("progress_at", 0.0):
                self._fields["progress_at"] = _progress_at
            fields = dict(self._fields)
            points, self._loss_points = self._loss_points, []
        if points:
            append_loss_points(self.status.dir, points)
        self.status.update(**fields)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.flush()
            except OSError:
                logger.exception("could not write the status heartbeat")

    def stop(self) -> None:
        """Stop the thread, join it, and write the final fields."""
        self._stop_event.set()
        if self.is_alive():
            self.join()
        self.flush()


def latest_snapshot(status_dir: str | os.PathLike[str], up_to_step: int | None = None) -> Path | None:
    """The newest evolution snapshot folder (highest step), or None.

    ``up_to_step``: the model's ``global_step``; a rolled-back file's snapshot above it stays on disk as
    a record but is not the model's latest. None: any step.
    """
    root = Path(status_dir) / "evolution"
    if not root.is_dir():
        return None
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if up_to_step is not None:
        folders = [p for p in folders if p.name[:8].isdigit() and int(p.name[:8]) <= up_to_step]
    return folders[-1] if folders else None


def figures_at(status_dir: str | os.PathLike[str], step: int) -> dict[str, Any]:
    """The status's fields that describe the model's last file, as they were when the model was at ``step``.

    From the evolution snapshot written at ``step`` (``last_eval``, ``forgetting``, ``quality_gate``,
    ``evaluation``, ``forward_transfer``), each None where there is none (step 0, a snapshot lost), and
    the training metrics cleared: what a rollback to ``step`` leaves in the status.
    """
    fields: dict[str, Any] = dict.fromkeys(("last_eval", *SNAPSHOT_FIGURES))
    fields["metrics"] = empty_status()["metrics"]
    folder = latest_snapshot(status_dir, step)
    if folder is None or not folder.name.startswith(f"{step:08d}-"):
        return fields
    try:
        snapshot = json.loads((folder / "snapshot.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return fields
    fields.update({key: snapshot.get(key) for key in SNAPSHOT_FIGURES})
    if snapshot.get("eval_loss") is not None:
        fields["last_eval"] = last_eval(step, snapshot.get("file"), snapshot["eval_loss"])
    return fields


def last_eval(step: int, file: str | None, eval_loss: float) -> dict[str, Any]:
    """The status's ``last_eval``: the held-out loss (nats) after ``file``, ended at ``step``, and its perplexity."""
    return {"step": step, "file": file, "eval_loss": eval_loss, "perplexity": perplexity(eval_loss)}


def beat(heartbeat: Heartbeat | None, **fields: Any) -> None:
    """Set status fields and write them now, marking progress for the daemon's stall detection."""
    if heartbeat is not None:
        heartbeat.set(progress_at=time.time(), **fields)
        heartbeat.flush()
