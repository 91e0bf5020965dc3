"""File boundaries: the steps at which done files ended, which a rollback can return to.

A *file boundary* is the ``global_step`` at which a done file ended (its ledger row's
``end_step``). The training run keeps the checkpoints of the last
``--keep_file_checkpoints`` boundaries out of rotation (:func:`kept_file_ends`).

Standard library only: no torch.
"""

from __future__ import annotations

from daemon.ledger import Ledger
from daemon.records import FileState


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
