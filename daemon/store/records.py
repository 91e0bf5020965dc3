"""Record types shared by the daemon and the training process (standard library only).

The daemon process never imports torch, so every record that both processes write or
read lives here:

- :class:`RunState`: ``state`` of ``status/training_status.json``.
- :class:`FileState`: ``state`` of a ledger row (its transitions: :mod:`daemon.store.ledger`).
- :class:`Outcome`: ``outcome`` of a ``status/history.jsonl`` row (``done``, ``failed``, ``rolled_back``,
  ``reopened``).
- :class:`FileProgress`: the status's ``current_file``.
- :class:`HistoryRow`: one ``history.jsonl`` row; the only place a row is built.

Names are the public ones (docs/guarantees.md "Folders and files"), one per quantity:
``planned_steps`` (optimizer steps this file adds), ``steps_done`` (of them, trained so
far), ``examples`` (training examples after packing, held-out slice excluded),
``replayed_examples`` (earlier files' examples trained with them, counted in ``planned_steps``),
``cooldown_steps`` (steps of the cooldown branch, never in ``global_step``),
``start_step`` / ``end_step`` (``global_step`` before and after a done file).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

UTC_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_now() -> str:
    """The current time as ISO-8601 UTC with a ``Z`` suffix, second precision."""
    return datetime.now(UTC).strftime(UTC_FORMAT)


def parse_utc(stamp: Any) -> float | None:
    """A :func:`utc_now` stamp (``2026-01-01T00:00:00Z``) as ``time.time()`` seconds; None when it is not one."""
    try:
        return datetime.strptime(str(stamp), UTC_FORMAT).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


class RunState(StrEnum):
    """What the product is doing now (``training_status.json`` ``state``)."""

    IDLE = "idle"
    LOADING = "loading"
    TOKENIZING = "tokenizing"
    TRAINING = "training"
    EVALUATING = "evaluating"
    SAVING = "saving"
    STOPPED = "stopped"
    FAILED = "failed"
    STALLED = "stalled"
    WAITING_FOR_DISK = "waiting_for_disk"  # the daemon holds a claimed file until its output folder has room

    @property
    def between_files(self) -> bool:
        """True for the states in which no training process is working on a file."""
        return self in (RunState.IDLE, RunState.STOPPED, RunState.FAILED, RunState.STALLED, RunState.WAITING_FOR_DISK)


class FileState(StrEnum):
    """Where a file stands in the ledger; the allowed transitions are ``ledger.TRANSITIONS``."""

    QUEUED = "queued"
    TRAINING = "training"
    DONE = "done"
    FAILED = "failed"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"  # was done; its steps left the model by ``python -m daemon rollback``

    @property
    def finished(self) -> bool:
        """True once nothing more happens to the file: it only has to be filed away."""
        return self in (
            FileState.DONE,
            FileState.FAILED,
            FileState.DUPLICATE,
            FileState.REJECTED,
            FileState.ROLLED_BACK,
        )


class Outcome(StrEnum):
    """How a file ended (``history.jsonl`` ``outcome``)."""

    DONE = "done"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"  # a later row cancelling an earlier done row of the same sha256 and start_step
    # Also cancels that row: the latest usable checkpoint lacks the file's last steps, which train again.
    REOPENED = "reopened"

    @property
    def cancels_done(self) -> bool:
        """True for the rows that cancel the latest earlier done row with their ``sha256`` and ``start_step``."""
        return self in (Outcome.ROLLED_BACK, Outcome.REOPENED)


@dataclass
class FileProgress:
    """The status's ``current_file``: the file being trained and how far it is.

    Attributes:
        name: file name in the inbox.
        sha256: hex digest of the file's bytes.
        examples: training examples (after packing; held-out slice excluded).
        eval_examples: held-out examples.
        tokens: tokens in the training examples.
        skipped_lines: malformed lines skipped.
        start_step: ``global_step`` at the start of the file's plan.
        planned_steps: optimizer steps the file adds.
        steps_done: of them, trained so far.
        progress: ``steps_done / planned_steps`` in [0, 1].
        eta_seconds: estimated seconds to the end of the plan, None before a rate is known.
        replayed_examples: earlier files' examples replayed with this file's (in ``planned_steps``).
        replayed_tokens: tokens in the replayed examples: a file's steps train ``tokens +
            replayed_tokens`` tokens an epoch (padding not counted).
        cooldown_steps: steps of the cooldown branch after the file (apart from ``planned_steps``).
    """

    name: str
    sha256: str
    examples: int
    eval_examples: int
    tokens: int
    skipped_lines: int
    start_step: int
    planned_steps: int
    steps_done: int = 0
    progress: float = 0.0
    eta_seconds: float | None = None
    replayed_examples: int = 0
    replayed_tokens: int = 0
    cooldown_steps: int = 0

    def __post_init__(self) -> None:
        self.advance(self.steps_done, None)

    def advance(self, steps_done: int, steps_per_second: float | None) -> None:
        """Record ``steps_done`` steps of the plan and the ETA at ``steps_per_second``."""
        self.steps_done = steps_done
        self.progress = round(steps_done / self.planned_steps, 4)
        left = self.planned_steps - steps_done
        self.eta_seconds = round(left / steps_per_second, 1) if steps_per_second else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HistoryRow:
    """One row of ``status/history.jsonl`` (docs/guarantees.md "Folders and files").

    For a done file ``end_step - start_step == planned_steps``; a failed file has no
    ``end_step`` and an ``error``. A ``rolled_back`` row repeats the steps of a done row
    written before it (same ``sha256`` and ``start_step``) whose steps a rollback took out
    of the model; its ``error`` says to which step. ``wall_seconds`` is the file's whole run
    in the training process, ``train_seconds`` the part inside the optimizer loop and
    ``eval_seconds`` the evaluation suite's (seconds). Losses are mean token cross-entropy
    in nats; ``eval_loss`` is the loss on the file's held-out slice. A ``reopened`` row, like a
    ``rolled_back`` one, repeats and cancels a done row; its file trains its missing steps again
    and gets a new done row (:mod:`daemon.store.reconcile`). ``quality_gate`` is
    what the gate found (:func:`daemon.quality.forgetting.quality_gate`), also on a file it rolled back.
    ``replayed_examples`` are the earlier files' examples trained with the file's ``examples``
    (both counted in ``planned_steps``), ``replayed_tokens`` their tokens beside the file's own
    ``tokens``; ``cooldown_steps`` / ``cooldown_seconds`` are the
    cooldown branch's (never in ``end_step``), whose model was evaluated and exported.
    """

    file: str
    sha256: str | None
    start_step: int | None
    end_step: int | None
    planned_steps: int | None
    examples: int | None
    tokens: int | None
    wall_seconds: float | None
    train_seconds: float | None
    train_loss: float | None
    eval_loss: float | None
    outcome: Outcome
    error: str | None
    finished_at: str
    eval_seconds: float | None = None
    quality_gate: dict[str, Any] | None = None
    replayed_examples: int | None = None
    replayed_tokens: int | None = None
    cooldown_steps: int | None = None
    cooldown_seconds: float | None = None

    @classmethod
    def done(
        cls,
        progress: FileProgress,
        started: float,
        train_seconds: float,
        train_loss: float | None,
        eval_loss: float | None,
        eval_seconds: float | None = None,
        quality_gate: dict[str, Any] | None = None,
        cooldown_seconds: float | None = None,
    ) -> HistoryRow:
        """The row of a file trained to its end; ``started`` is a ``time.monotonic()`` value."""
        return cls(
            file=progress.name,
            sha256=progress.sha256,
            start_step=progress.start_step,
            end_step=progress.start_step + progress.planned_steps,
            planned_steps=progress.planned_steps,
            examples=progress.examples,
            tokens=progress.tokens,
            wall_seconds=round(time.monotonic() - started, 2),
            train_seconds=round(train_seconds, 2),
            train_loss=train_loss,
            eval_loss=eval_loss,
            outcome=Outcome.DONE,
            error=None,
            finished_at=utc_now(),
            eval_seconds=None if eval_seconds is None else round(eval_seconds, 2),
            quality_gate=quality_gate,
            replayed_examples=progress.replayed_examples,
            replayed_tokens=progress.replayed_tokens,
            cooldown_steps=progress.cooldown_steps,
            cooldown_seconds=None if cooldown_seconds is None else round(cooldown_seconds, 2),
        )

    @classmethod
    def failed(
        cls,
        name: str,
        error: str,
        sha256: str | None = None,
        progress: FileProgress | None = None,
        started: float | None = None,
        quality_gate: dict[str, Any] | None = None,
    ) -> HistoryRow:
        """The row of a failed file; what is known of its plan (``progress``) is kept."""
        return cls(
            file=name,
            sha256=progress.sha256 if progress else sha256,
            start_step=progress.start_step if progress else None,
            end_step=None,
            planned_steps=progress.planned_steps if progress else None,
            examples=progress.examples if progress else None,
            tokens=progress.tokens if progress else None,
            wall_seconds=None if started is None else round(time.monotonic() - started, 2),
            train_seconds=None,
            train_loss=None,
            eval_loss=None,
            outcome=Outcome.FAILED,
            error=error,
            finished_at=utc_now(),
            quality_gate=quality_gate,
            replayed_examples=progress.replayed_examples if progress else None,
        )

    @classmethod
    def rolled_back(
        cls,
        name: str,
        sha256: str | None,
        start_step: int | None,
        end_step: int | None,
        planned_steps: int | None,
        to_step: int,
    ) -> HistoryRow:
        """The row of a done file (steps ``start_step -> end_step``) rolled back to step ``to_step``."""
        return cls(
            file=name,
            sha256=sha256,
            start_step=start_step,
            end_step=end_step,
            planned_steps=planned_steps,
            examples=None,
            tokens=None,
            wall_seconds=None,
            train_seconds=None,
            train_loss=None,
            eval_loss=None,
            outcome=Outcome.ROLLED_BACK,
            error=f"rolled back to step {to_step}",
            finished_at=utc_now(),
        )

    @classmethod
    def reopened(
        cls, name: str, sha256: str | None, start_step: int, end_step: int, planned_steps: int, why: str
    ) -> HistoryRow:
        """The row of a done file (steps ``start_step -> end_step``) reopened to train its missing steps again."""
        row = cls.rolled_back(name, sha256, start_step, end_step, planned_steps, start_step)
        row.outcome, row.error = Outcome.REOPENED, why
        return row

    def as_dict(self) -> dict[str, Any]:
        """The JSON object written to ``history.jsonl`` (enums as their string values)."""
        row = asdict(self)
        row["outcome"] = str(self.outcome)
        return row
