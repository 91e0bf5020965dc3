"""Undo every step above one: the one way the store forgets a model that no longer stands.

A file that fails mid-plan, a file the quality gate refuses, and ``python -m daemon rollback`` all
return the running model to an earlier ``global_step``; :func:`undo_after` takes out what the later
models left: their checkpoints and export (:func:`daemon.store.checkpoints.roll_back`), their
evaluation rows (``evaluations.jsonl``), the held-out slices of files that ended after the step
(:mod:`daemon.store.suite`) and those files' replay shares (:mod:`daemon.store.replay`). Each part is
safe to repeat after a kill. :func:`fail_file` is the failure path: undo, then mark the row failed.
"""

from __future__ import annotations

from pathlib import Path

from daemon.quality.forgetting import read_rows, write_rows
from daemon.store.checkpoints import roll_back
from daemon.store.ledger import Ledger, LedgerRow
from daemon.store.replay import drop_after
from daemon.store.suite import drop_slices_after


def undo_after(
    status_dir: str | Path, step: int, output_dir: str | Path | None = None, end_step: int | None = None
) -> None:
    """Forget every model after ``step``: their checkpoints and export, evaluation rows, slices and replay shares.

    Args:
        status_dir: the status folder (evaluation rows, the suite, the replay store).
        step: the ``global_step`` the model returns to.
        output_dir: the running model's folder; None leaves checkpoints and the export as they are
            (a caller that undoes them in a stage of its own, or that writes a model's records anew).
        end_step: the last step undone in ``output_dir`` (a failed file's plan end); None for all.
    """
    if output_dir is not None:
        roll_back(output_dir, step, end_step, status_dir)
    if any(row["step"] > step for row in read_rows(status_dir)):
        write_rows(status_dir, step, [])
    drop_slices_after(status_dir, step)
    drop_after(status_dir, step)


def fail_file(ledger: Ledger, entry: LedgerRow, error: str, output_dir: str | Path) -> None:
    """Mark a file failed in the ledger, first undoing the steps of its recorded plan (:func:`undo_after`).

    A file is never both "failed" and in the weights, nor in the replay store or the suite. Used
    by the training process when a file fails (the quality gate's refusal included) and by the
    daemon when it gives up on one.
    """
    if entry.state == "training" and entry.start_step is not None and entry.planned_steps is not None:
        end = entry.start_step + entry.planned_steps
        undo_after(ledger.path.parent, entry.start_step, output_dir, end)
    ledger.fail(entry.id, error)
