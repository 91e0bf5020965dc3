"""One file's run as :func:`daemon.training.prepare.setup` prepares it: its data, starting model and plan.

Apart from :mod:`daemon.training.run` so that the phases that read it (evaluation, the cooldown
branch) import this, not the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from daemon.store.checkpoints import Checkpoint
    from daemon.store.jsonl import FileScan
    from daemon.store.ledger import LedgerRow
    from daemon.store.records import FileProgress
    from daemon.training.data import PreparedData
    from daemon.training.plan import StepPlan


@dataclass
class PreparedFile:
    """Everything :func:`~daemon.training.prepare.setup` prepares for :meth:`~daemon.training.run.FileRun.fit`:
    one file's data, starting model and plan.

    Attributes:
        model, tokenizer: the model to train (from ``checkpoint`` when there is one).
        datasets: the tokenized training examples and the held-out slice.
        report: what the scan found in the file (sha256, shape, malformed lines).
        checkpoint: the latest complete checkpoint, None for a new model.
        plan: the file's step plan.
        steps_done: steps of the plan already trained (an interrupted file resumes).
        resumed: the ledger row whose plan this run continues, if any.
        abandoned: a ``training`` ledger row of this file whose plan the running model has
            left (e.g. checkpoints were deleted); :func:`~daemon.training.plan.commit_plan` closes it.
        progress: the status's ``current_file``.
        averaged: what ``model`` became the average of after training, for ``export.json``
            (:func:`daemon.training.averaging.average_export`) or its interpolation with the base
            (:func:`daemon.training.wise.wise_export`), None for the file's own end model.
        recorded: what ``--cooldown_mix balanced`` drew from each share
            (:mod:`daemon.training.cooldown_mix`), added to the status's ``evaluation``.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    datasets: PreparedData
    scan: FileScan
    checkpoint: Checkpoint | None
    plan: StepPlan
    steps_done: int
    resumed: LedgerRow | None
    abandoned: LedgerRow | None
    progress: FileProgress
    averaged: dict[str, Any] | None = None
    recorded: dict[str, Any] = field(default_factory=dict)
