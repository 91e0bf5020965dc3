"""Done files whose steps the model lost: found, reopened, or refused in one line (docs/guarantees.md "Guarantees").

The step invariant says the latest usable checkpoint's ``global_step`` is the sum of the done
files' ``planned_steps``. A done file's end checkpoint can still come back torn (a power loss
on a disk that lied about its cache, a fault of the medium): the newest usable checkpoint is
then an earlier one, behind that file's ``end_step``. Going on would train the next file from
there while the ledger and the history say the lost steps are in the model.

The daemon reconciles instead (:mod:`daemon.service.watcher`, before it trains anything):
:func:`files_behind` finds the done files the model lacks steps of, :func:`locate` finds each
one's data (same size and sha256) in ``inbox/done/`` or ``inbox/processing/``, and
:func:`reopen` moves them ``done -> training`` in the ledger (plan and ``end_step`` kept) with a
``reopened`` history row and a log line. Each then trains in a child like a file interrupted
mid-file: from the latest usable checkpoint inside its recorded plan, the same examples in the
same order (:func:`daemon.training.plan.recorded_plan`), to its ``end_step`` and a new done row. While
they train the ledger holds them as ``training``, so the invariant holds whenever it is read.
When a file's data is gone the daemon stops with :func:`missing_data_error`, and a training
run on its own refuses the same way (:func:`refuse_missing_steps`).

An output folder with no checkpoint folder at all, complete or torn, is a model started anew
(another ``--output_dir``, or ``current_model/`` removed by hand): nothing is reconciled there.

Standard library only: the daemon process uses it without torch.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from daemon.exceptions import CheckpointError
from daemon.names import printable
from daemon.service.entries import sha256_of
from daemon.store.checkpoints import CHECKPOINT_RE, TORN_RE, complete_checkpoint_steps
from daemon.store.ledger import Ledger, LedgerRow
from daemon.store.records import FileState, HistoryRow
from daemon.store.rollback import file_boundaries
from daemon.store.status import StatusFile

logger = logging.getLogger(__name__)

# Where the daemon keeps a done file's data: filed away, or still claimed (done, not yet moved).
DATA_FOLDERS = ("done", "processing")
Trainer = Callable[[Path, LedgerRow], LedgerRow]  # the daemon's attempt loop for one file


def files_behind(ledger: Ledger, output_dir: str | Path) -> tuple[int, list[LedgerRow]]:
    """The latest usable checkpoint's step and the files whose steps above it the ledger counts.

    Args:
        ledger: the status folder's ledger.
        output_dir: the running model's folder.

    Returns:
        ``(step, rows)``: ``rows`` are the done rows ending above ``step`` and the rows already
        reopened (``training`` with an ``end_step``), by ``start_step``; empty when the
        output folder holds no checkpoint folder at all.
    """
    root = Path(output_dir)
    if not root.is_dir() or not any(CHECKPOINT_RE.match(p.name) or TORN_RE.match(p.name) for p in root.iterdir()):
        return 0, []
    steps = complete_checkpoint_steps(root)
    step = steps[0] if steps else 0
    done = [e for e in ledger.entries(FileState.DONE) if e.end_step is not None and e.end_step > step]
    reopened = [e for e in ledger.entries(FileState.TRAINING) if e.end_step is not None]
    return step, sorted(done + reopened, key=lambda e: (e.start_step or 0, e.id))


def locate(entry: LedgerRow, inbox_dir: str | Path) -> Path | None:
    """The file in ``inbox/done/`` or ``inbox/processing/`` holding ``entry``'s content, or None.

    Only regular files of the row's size are hashed, its own name first; folders that are
    links are not looked into (the inbox is not trusted).
    """
    if entry.sha256 is None:
        return None
    for sub in DATA_FOLDERS:
        folder = Path(inbox_dir) / sub
        try:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                continue
            names = sorted(os.listdir(folder), key=lambda n: n != entry.name)
        except OSError:
            continue
        for name in names:
            path = folder / name
            try:
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and st.st_size == entry.size and sha256_of(path)[0] == entry.sha256:
                    return path
            except OSError:
                continue
    return None


def reconcile(
    ledger: Ledger, status: StatusFile, output_dir: str | Path, inbox_dir: str | Path, train: Trainer
) -> Iterator[LedgerRow]:
    """Reopen the files behind the latest usable checkpoint and train each again, oldest first.

    Args:
        ledger, status: the status folder's ledger and status file.
        output_dir: the running model's folder.
        inbox_dir: the daemon's inbox, whose ``done/`` and ``processing/`` hold the files' data.
        train: trains a file for its ledger row until the row is finished or the daemon stops,
            and returns the row (the daemon's attempt loop).

    Yields:
        Each file's row once ``train`` returned (``done``, or ``failed`` with its steps rolled
        back); the caller stops iterating when the daemon stops.

    Raises:
        CheckpointError: a file's data is gone (:func:`missing_data_error`); nothing is changed.
    """
    step, behind = files_behind(ledger, output_dir)
    if not behind:
        return
    found = {e.id: locate(e, inbox_dir) for e in behind}
    lost = [e for e in behind if found[e.id] is None]
    if lost:
        raise missing_data_error(lost, step, inbox_dir, ledger, output_dir)
    reopen(ledger, status, behind, step)
    for old in behind:
        path = found[old.id]
        assert path is not None
        entry = train(path, ledger.get(old.id) or old)
        if entry.state == FileState.DONE:
            logger.info("%s: trained again up to step %s", printable(entry.name), entry.end_step)
        elif entry.state.finished:
            logger.error("%s: %s", printable(entry.name), printable(entry.error or str(entry.state)))
        yield entry


def reopen(ledger: Ledger, status: StatusFile, rows: list[LedgerRow], step: int) -> None:
    """Reopen the done ``rows`` (``done -> training``) with a ``reopened`` history row and a log line each.

    Rows already reopened are left as they are, so a daemon killed part-way reopens the rest.

    Args:
        ledger, status: the status folder's ledger and status file.
        rows: from :func:`files_behind`.
        step: the latest usable checkpoint's step, where the first of them resumes.
    """
    for entry in rows:
        if entry.state != FileState.DONE:
            continue
        assert entry.start_step is not None and entry.end_step is not None and entry.planned_steps is not None
        resume = max(step, entry.start_step)
        why = (
            f"reopened: the latest usable checkpoint is step {step}, so steps {resume + 1}-{entry.end_step} "
            f"train again from step {resume} (its later checkpoints were torn or missing)"
        )
        logger.warning("%s: %s", printable(entry.name), why)
        ledger.reopen(entry.id, why)
        status.record_outcome(
            HistoryRow.reopened(entry.name, entry.sha256, entry.start_step, entry.end_step, entry.planned_steps, why)
        )


def missing_data_error(rows: list[LedgerRow], step: int, inbox_dir: str | Path, ledger: Ledger, output_dir: str | Path):
    """The one-line refusal when reopened files' data is gone: what is missing and what to do.

    Args:
        rows: the rows whose data :func:`locate` did not find.
        step: the latest usable checkpoint's step.
        inbox_dir: the daemon's inbox.
        ledger, output_dir: the status folder's ledger and the running model's folder.

    Returns:
        The :class:`CheckpointError` to raise.
    """
    lost = ", ".join(f"{printable(e.name)} (steps {e.start_step} -> {e.end_step}, sha256 {e.sha256})" for e in rows)
    return CheckpointError(
        f"the latest usable checkpoint in {output_dir} is step {step}, behind done files whose data is gone "
        f"from {Path(inbox_dir) / 'done'}: {lost}; put the same content back there and start again to train "
        f"their missing steps, or {_rollback_hint(ledger, output_dir, step)}"
    )


def _rollback_hint(ledger: Ledger, output_dir: str | Path, step: int) -> str:
    """How to take the files behind ``step`` out of the model: the rollback to the nearest boundary below it."""
    below = [b.step for b in file_boundaries(output_dir, ledger.path.parent) if b.step <= step]
    folders = f"--output_dir {output_dir} --status_dir {ledger.path.parent}"
    if below:
        return f"take them out of the model: python -m daemon rollback --to_step {max(below)} {folders}"
    return f"see where the model can go back to: python -m daemon rollback --list {folders}"


def refuse_missing_steps(ledger: Ledger, output_dir: str | Path, claim: LedgerRow | None) -> None:
    """For a training run: refuse to go on while done files' steps are missing from the model.

    Under the daemon they were reopened before the run started (``claim`` is one of them, or
    none is left); a run of ``train.py`` on its own is told what to do.

    Raises:
        CheckpointError: a done row ends above the latest usable checkpoint.
    """
    step, behind = files_behind(ledger, output_dir)
    done = [e for e in behind if e.state == FileState.DONE and (claim is None or e.id != claim.id)]
    if not done:
        return
    names = ", ".join(f"{printable(e.name)} (steps {e.start_step} -> {e.end_step})" for e in done)
    raise CheckpointError(
        f"the latest usable checkpoint in {output_dir} is step {step}, behind done files the ledger counts: "
        f"{names}; start python -m daemon on these folders to train their missing steps again from inbox/done/, "
        f"or {_rollback_hint(ledger, output_dir, step)}"
    )
