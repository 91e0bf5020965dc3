"""Rolling the running model back to a kept file boundary: ``python -m daemon rollback``.

A *file boundary* is the ``global_step`` at which a done file ended (its ledger row's
``end_step``). The training run keeps the checkpoints of the last
``--keep_file_checkpoints`` boundaries out of rotation (:func:`kept_file_ends`); every
boundary whose checkpoint is still complete can be rolled back to (:func:`file_boundaries`).

A rollback to step N (:func:`roll_back_to`), with the output and status folders locked:

1. writes its intent, ``<status_dir>/rollback.json`` (atomically): N, the output folder,
   and the done files that ended after N;
2. deletes the checkpoints above N and makes the export ``checkpoint-N``'s model, with a
   model card listing the files up to N (:func:`daemon.store.checkpoints.roll_back`);
3. marks those files ``rolled_back`` in the ledger, in one transaction;
4. appends one ``rolled_back`` row per file to ``history.jsonl``;
5. sets the status's ``global_step`` to N (and, with a model registry, moves its ``champion`` alias
   back to N's version: :func:`daemon.store.registry.roll_back_champion`);
6. deletes the intent.

Every step is idempotent, so a rollback killed at any moment is finished by whatever
starts next on those folders: the next ``rollback``, a daemon (its start), ``train.py`` (before
it parses its flags, which follow the checkpoints: a rollback across a ``--merge_adapter`` changes
the line's kind) or a training run (``train_file``) call :func:`finish_interrupted_work` before
anything else. The next file then continues from step N.

Standard library and ``filelock`` only: this command moves files and never imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock

from daemon.config_file import command_parser, parse_command
from daemon.exceptions import DaemonError, RollbackError
from daemon.store.adapter_files import finish_interrupted_merge, interrupted_merges
from daemon.store.checkpoints import CHECKPOINT_RE, checkpoint_usage, complete_checkpoint_steps, export_step, roll_back
from daemon.store.files import atomic_write_text
from daemon.store.ledger import Ledger
from daemon.store.ledger_file import LEDGER_FILE
from daemon.store.locks import lock_folders, release_folders
from daemon.store.records import FileState, HistoryRow, utc_now
from daemon.store.registry import roll_back_champion
from daemon.store.status import StatusFile, figures_at
from daemon.store.undo import undo_after

logger = logging.getLogger(__name__)

INTENT_FILE = "rollback.json"
# Serialises the processes of one torchrun job that find the same interrupted rollback (only rank 0 locks folders).
INTENT_LOCK = ".rollback.lock"
# Test hook: the rollback exits at once (as if SIGKILLed) after the stage of this name ("intent", "checkpoints",
# "ledger", "history:<n>", "status"), so tests can kill a real rollback between any two of its steps.
EXIT_AFTER_ENV = "CONTINUAL_ROLLBACK_EXIT_AFTER"


@dataclass(frozen=True)
class Boundary:
    """A step a rollback can return to: where the done file ``file`` ended, with a complete checkpoint."""

    step: int
    file: str
    finished_at: str | None


@dataclass(frozen=True)
class RolledBackFile:
    """A done file whose steps a rollback takes out of the model: its ledger row and its plan."""

    id: int
    name: str
    sha256: str | None
    start_step: int | None
    end_step: int | None
    planned_steps: int | None


@dataclass
class RollbackIntent:
    """``<status_dir>/rollback.json``: what a rollback does, written before it touches anything.

    Attributes:
        to_step: the file boundary the model returns to.
        output_dir: the running model's folder (absolute).
        files: the done files that ended after ``to_step``, oldest first.
        started_at: when the rollback began (ISO-8601 UTC).
    """

    to_step: int
    output_dir: str
    files: list[RolledBackFile] = field(default_factory=list)
    started_at: str = field(default_factory=utc_now)


def kept_file_ends(ledger: Ledger, keep: int) -> set[int]:
    """The ``end_step`` of the last ``keep`` done files: the checkpoints rotation must keep.

    Args:
        ledger: the ledger of the run's status folder.
        keep: ``--keep_file_checkpoints``; 0 keeps none.

    Returns:
        The steps (a set of at most ``keep``).
    """
    ends = sorted({e.end_step for e in ledger.entries(FileState.DONE) if e.end_step is not None}, reverse=True)
    return set(ends[: max(0, keep)])


def file_boundaries(output_dir: str | Path, status_dir: str | Path) -> list[Boundary]:
    """The steps a rollback can return to, oldest first: done files' ends whose checkpoint is complete.

    Reads only: no ledger is created where there is none, and no checkpoint is moved.
    """
    if not (Path(status_dir) / LEDGER_FILE).exists():
        return []
    complete = set(complete_checkpoint_steps(output_dir))
    done = Ledger(status_dir).entries(FileState.DONE)
    return sorted(
        (Boundary(e.end_step, e.name, e.finished_at) for e in done if e.end_step in complete),
        key=lambda b: b.step,
    )


def roll_back_to(output_dir: str | Path, status_dir: str | Path, to_step: int) -> RollbackIntent | None:
    """Return the model to the file boundary ``to_step`` (call with both folders locked).

    Args:
        output_dir: the running model's folder.
        status_dir: the status folder (ledger, history, status, the intent).
        to_step: a step of :func:`file_boundaries`.

    Returns:
        What was done, or None when the model is already exactly at ``to_step``.

    Raises:
        RollbackError: ``to_step`` is not a kept file boundary; nothing was changed.
    """
    steps = [b.step for b in file_boundaries(output_dir, status_dir)]
    if to_step not in steps:
        valid = ", ".join(map(str, steps)) if steps else f"none (no done file's end checkpoint is in {output_dir})"
        raise RollbackError(f"step {to_step} is not a kept file boundary; valid steps: {valid}")
    later = [e for e in Ledger(status_dir).entries(FileState.DONE) if e.end_step is not None and e.end_step > to_step]
    above = [p for p in Path(output_dir).iterdir() if (m := CHECKPOINT_RE.match(p.name)) and int(m[1]) > to_step]
    if not later and not above and export_step(output_dir) == to_step:
        return None
    files = [
        RolledBackFile(e.id, e.name, e.sha256, e.start_step, e.end_step, e.planned_steps)
        for e in sorted(later, key=lambda e: e.end_step or 0)
    ]
    intent = RollbackIntent(to_step, str(Path(output_dir).resolve()), files)
    atomic_write_text(Path(status_dir) / INTENT_FILE, json.dumps(asdict(intent), indent=2) + "\n")
    _reached("intent")
    _carry_out(intent, status_dir)
    return intent


def _carry_out(intent: RollbackIntent, status_dir: str | Path) -> None:
    """Steps 2 to 6 of a rollback (module docstring); each may be repeated after a kill."""
    roll_back(intent.output_dir, intent.to_step, status_dir=status_dir)
    _reached("checkpoints")
    ledger = Ledger(status_dir)
    try:
        ledger.roll_back(current_ids(ledger, intent.files), intent.to_step)
    except ValueError as e:  # a row in another state than done: the ledger and the intent disagree
        raise RollbackError(
            f"{Path(status_dir) / INTENT_FILE}: the unfinished rollback to step {intent.to_step} cannot mark its files "
            f"rolled back ({e}); the ledger is left as it was"
        ) from e
    _reached("ledger")
    status = StatusFile(status_dir)
    for n, f in enumerate(intent.files, start=1):
        row = HistoryRow.rolled_back(f.name, f.sha256, f.start_step, f.end_step, f.planned_steps, intent.to_step)
        status.record_outcome(row)
        _reached(f"history:{n}")
    # the figures of the file at to_step again, not of the undone ones; the checkpoints left
    figures = figures_at(status_dir, intent.to_step)
    usage = checkpoint_usage(intent.output_dir)
    status.update(global_step=intent.to_step, max_steps=intent.to_step, current_file=None, checkpoints=usage, **figures)
    undo_after(status_dir, intent.to_step)  # the undone files' evaluation rows, held-out slices, replay shares
    roll_back_champion(status_dir, intent.to_step)  # --register_model: the alias moves back, versions stay
    _reached("status")
    (Path(status_dir) / INTENT_FILE).unlink(missing_ok=True)
    logger.info("rolled back to step %d", intent.to_step)


def current_ids(ledger: Ledger, files: list[RolledBackFile]) -> list[int]:
    """The ledger rows of an intent's files now: by id, or, where the ledger was rebuilt since the intent was written
    (``python -m daemon rebuild-ledger`` numbers its rows anew), by the same content and steps; a file the ledger no
    longer holds (a rebuilt ledger keeps only the done files of the history) has nothing to roll back."""
    entries, ids = ledger.entries(), []
    for f in files:
        same = [e for e in entries if (e.sha256, e.start_step, e.end_step) == (f.sha256, f.start_step, f.end_step)]
        by_id = [e for e in same if e.id == f.id]
        if by_id or same:
            ids.append((by_id or same)[0].id)
    return ids


def _reached(stage: str) -> None:
    """The test hook of :data:`EXIT_AFTER_ENV`: exit here as abruptly as a SIGKILL would."""
    if os.environ.get(EXIT_AFTER_ENV) == stage:
        os._exit(137)


def read_intent(status_dir: str | Path) -> RollbackIntent | None:
    """The interrupted rollback recorded in ``<status_dir>/rollback.json``, or None if there is none.

    Raises:
        RollbackError: the file is there but unreadable (it is written atomically, so only by hand).
    """
    path = Path(status_dir) / INTENT_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return RollbackIntent(**{**doc, "files": [RolledBackFile(**f) for f in doc["files"]]})
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as e:
        raise RollbackError(f"{path} is not a rollback intent ({e}); move it away to go on") from e


def finish_interrupted_rollback(output_dir: str | Path, status_dir: str | Path) -> RollbackIntent | None:
    """Finish a rollback that was killed part-way; a no-op when none is pending.

    Called before anything else by whatever owns the folders next: ``python -m daemon
    rollback``, a daemon's start (``Daemon.run``) and a training run (``train_file``).
    The processes of one torchrun job may all call it: one finishes, the others wait
    for it, then find nothing left to do.

    Args:
        output_dir: the caller's output folder.
        status_dir: the caller's status folder, where the intent is.

    Returns:
        The rollback finished now, or None.

    Raises:
        RollbackError: the pending rollback is another output folder's (it is left pending).
    """
    if not (Path(status_dir) / INTENT_FILE).exists():  # deleted only as a rollback's very last step
        return None
    with FileLock(str(Path(status_dir) / INTENT_LOCK)):
        intent = read_intent(status_dir)
        if intent is None:  # another process of this job finished it meanwhile
            return None
        if Path(intent.output_dir).resolve() != Path(output_dir).resolve():
            raise RollbackError(
                f"{Path(status_dir) / INTENT_FILE} is an unfinished rollback of {intent.output_dir}, not of "
                f"{output_dir}: finish it with python -m daemon rollback --list --output_dir {intent.output_dir} "
                f"--status_dir {status_dir}"
            )
        logger.warning("finishing the interrupted rollback to step %d of %s", intent.to_step, intent.output_dir)
        _carry_out(intent, status_dir)
    return intent


def interrupted_work(output_dir: str | Path, status_dir: str | Path) -> bool:
    """Whether a kill left work half done on these folders: a rollback's intent, or a ``--merge_adapter`` swap
    (:func:`daemon.store.adapter_files.interrupted_merges`). Reads names only."""
    return (Path(status_dir) / INTENT_FILE).exists() or bool(interrupted_merges(output_dir))


def finish_interrupted_work(output_dir: str | Path, status_dir: str | Path) -> None:
    """Finish what a kill left half done on these folders, before anything reads a checkpoint; a no-op when nothing.

    First a ``--merge_adapter`` swap cut between its renames
    (:func:`daemon.store.adapter_files.finish_interrupted_merge`), then a rollback
    (:func:`finish_interrupted_rollback`). Called with the folders owned, by ``python -m daemon rollback``, a
    daemon's start, ``train.py`` before it parses its flags (they follow the checkpoints) and a training run;
    the processes of one torchrun job may all call it (one finishes, the others find nothing).

    Raises:
        RollbackError: the pending rollback is another output folder's (it is left pending).
        OSError: a merge's folder cannot be renamed.
    """
    if interrupted_merges(output_dir):
        Path(status_dir).mkdir(parents=True, exist_ok=True)
        with FileLock(str(Path(status_dir) / INTENT_LOCK)):
            finish_interrupted_merge(output_dir)
    finish_interrupted_rollback(output_dir, status_dir)


def format_boundaries(boundaries: list[Boundary], current: int | None) -> str:
    """The ``--list`` table: one line per boundary, the current step marked with ``*``."""
    if not boundaries:
        return "no kept file boundary: no done file's end checkpoint is left"
    lines = ["  step  finished_at           file"]
    for b in boundaries:
        mark = "*" if b.step == current else " "
        lines.append(f"{mark}{b.step:>5}  {b.finished_at or '-':<20}  {b.file}")
    if current is not None and current not in {b.step for b in boundaries}:
        lines.append(f"(the model is at step {current}, inside a file not finished)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``python -m daemon rollback (--to_step N | --list) [--output_dir current_model] [--status_dir status]``.

    Returns:
        The exit code: 0 done (or listed), 1 refused with one line on stderr (a daemon or
        ``train.py`` owns a folder, or N is not a kept file boundary; nothing changed), 2 bad usage.
    """
    parser = command_parser("python -m daemon rollback", "Roll the running model back to a kept file boundary.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--to_step", type=int, help="The step to return to: where a done file ended (see --list).")
    what.add_argument("--list", action="store_true", help="List the steps a rollback can return to.")
    try:
        args = parse_command(parser, argv)
        if args.list and not interrupted_work(args.output_dir, args.status_dir):  # no lock: fine beside a daemon
            return _list(args.output_dir, args.status_dir)
        folders = [("output", args.output_dir), ("status", args.status_dir)]
        locks = lock_folders(folders)  # as train.py takes them: refused while a daemon or train.py runs
        try:
            finish_interrupted_work(args.output_dir, args.status_dir)
            if args.list:
                return _list(args.output_dir, args.status_dir)
            intent = roll_back_to(args.output_dir, args.status_dir, args.to_step)
        finally:
            release_folders(locks)
    except DaemonError as e:
        print(f"error: cannot roll back: {e}", file=sys.stderr, flush=True)
        return 1
    if intent is None:
        print(f"the model is already at step {args.to_step}: nothing to roll back")
    else:
        undone = ", ".join(f"{f.name} ({f.start_step} -> {f.end_step})" for f in intent.files) or "none"
        print(f"rolled back to step {intent.to_step} (the export is its checkpoint); files rolled back: {undone}")
    return 0


def _list(output_dir: str, status_dir: str) -> int:
    steps = complete_checkpoint_steps(output_dir)
    print(format_boundaries(file_boundaries(output_dir, status_dir), steps[0] if steps else None))
    return 0
