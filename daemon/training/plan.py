"""Step accounting: how many optimizer steps one file adds, and what is left after an interruption.

Pure arithmetic (docs/data.md, step accounting)::

    effective_batch = per_device_train_batch_size * gradient_accumulation_steps * world_size
    planned_steps   = ceil(num_train_epochs * ceil((examples + replayed_examples) / effective_batch))
    max_steps       = start_step + planned_steps

``examples`` are counted after packing and after the held-out split; ``replayed_examples``
are the earlier files' examples mixed in by replay (:mod:`daemon.store.replay`); ``start_step`` is
the ``global_step`` of the latest complete checkpoint. ``planned_steps`` is what the
specification's formula calls ``steps_for_file``; the product uses one name for it in
code, status, history and ledger.

Where a plan is kept: :func:`recorded_plan` finds the ledger's plan of an interrupted
file (resumed exactly), :func:`half_trained_file` any such file at a step, and :func:`commit_plan`
writes a new plan to the ledger before the file's first step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from daemon.exceptions import TrainingError
from daemon.store.checkpoints import set_aside_torn_checkpoints
from daemon.store.records import FileState

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from daemon.store.jsonl import FileScan
    from daemon.store.ledger import Ledger, LedgerRow

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepPlan:
    """The step accounting of one file.

    ``planned_steps = ceil(epochs * ceil((examples + replayed_examples) / effective_batch))``: whole epochs give
    ``epochs * ceil(...)``; the rounding matches ``Trainer.set_initial_training_values``,
    which counts a last partial accumulation as a step.

    Attributes:
        start_step: ``global_step`` before the file.
        examples: training examples of the file (after packing, held-out slice excluded).
        per_device_train_batch_size, gradient_accumulation_steps, world_size: as in ``TrainingArguments``.
        epochs: passes over the file (``--num_train_epochs``; may be fractional).
        replayed_examples: earlier files' examples replayed with this file's (``--replay_fraction``).
    """

    start_step: int
    examples: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    epochs: float
    replayed_examples: int = 0

    @property
    def effective_batch(self) -> int:
        """Examples per optimizer step over all processes."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def trained_examples(self) -> int:
        """Examples of one epoch: the file's own and the replayed ones."""
        return self.examples + self.replayed_examples

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.trained_examples / self.effective_batch)

    @property
    def planned_steps(self) -> int:
        """Optimizer steps this file adds to the running model."""
        return math.ceil(self.epochs * self.steps_per_epoch)

    @property
    def max_steps(self) -> int:
        """``global_step`` at the end of the file."""
        return self.start_step + self.planned_steps

    def segments(self, steps_done: int) -> list[tuple[int, int, int]]:
        """What is left after ``steps_done`` of this file's steps, one segment per epoch.

        Epoch ``e`` trains the file's examples in its own fixed order, ``effective_batch``
        examples per step, the last batch partial; a fractional last epoch stops early.
        Resuming at any step therefore trains exactly the remaining steps on the
        not-yet-seen examples.

        Returns:
            ``[(epoch, first_batch, steps), ...]`` in training order (empty when done).
        """
        out = []
        step = steps_done
        while step < self.planned_steps:
            epoch, first_batch = divmod(step, self.steps_per_epoch)
            steps = min(self.steps_per_epoch - first_batch, self.planned_steps - step)
            out.append((epoch, first_batch, steps))
            step += steps
        return out

    def segment_rows(self, first_batch: int, steps: int) -> range:
        """Indices, in one epoch's order, of the examples of ``steps`` batches from ``first_batch``."""
        eb = self.effective_batch
        return range(first_batch * eb, min(self.trained_examples, (first_batch + steps) * eb))


def plan_steps(start_step: int, examples: int, args: TrainingArguments, replayed_examples: int = 0) -> StepPlan:
    """Build the :class:`StepPlan` for a file of ``examples`` (plus ``replayed_examples``) starting at ``start_step``.

    Raises:
        TrainingError: the plan would train zero steps (never reported as done).
    """
    plan = StepPlan(
        start_step=start_step,
        examples=examples,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        world_size=max(1, args.world_size),
        epochs=args.num_train_epochs,
        replayed_examples=replayed_examples,
    )
    if plan.planned_steps <= 0:
        raise TrainingError(f"the plan has no step ({examples} examples, {plan.epochs} epochs)")
    return plan


def recorded_plan(
    ledger: Ledger, scan: FileScan, at_step: int, claim: LedgerRow | None
) -> tuple[LedgerRow | None, LedgerRow | None]:
    """``(resumed, abandoned)``: the ledger's plan for this file if training it was interrupted inside it.

    The row is ``claim`` (the daemon's) or, for ``train.py`` on its own, the newest
    ``training`` row with this content. A recorded plan that the running model has
    left (the checkpoint is outside ``[start_step, start_step + planned_steps]``) cannot be
    resumed exactly: it is returned as ``abandoned`` and the file is planned anew.
    """
    entry = claim if claim is not None else ledger.find(scan.sha256, (FileState.TRAINING,))
    if entry is None or entry.state != FileState.TRAINING or entry.start_step is None or entry.planned_steps is None:
        return None, None
    if entry.start_step <= at_step <= entry.start_step + entry.planned_steps:
        return entry, None
    logger.warning(
        "%s: its recorded plan %d -> %d no longer matches the latest checkpoint (step %d); planning anew",
        scan.path.name,
        entry.start_step,
        entry.start_step + entry.planned_steps,
        at_step,
    )
    return None, entry


def half_trained_file(ledger: Ledger, at_step: int) -> LedgerRow | None:
    """The newest ``training`` row whose recorded plan holds ``at_step`` (a file interrupted inside it), or None.

    Such a file resumes only under the flags its plan was made with (:func:`recorded_plan`), from a
    checkpoint of the same kind.
    """
    inside = [
        row
        for row in ledger.entries(FileState.TRAINING)
        if row.start_step is not None
        and row.planned_steps is not None
        and row.start_step <= at_step <= row.start_step + row.planned_steps
    ]
    return inside[-1] if inside else None


def commit_plan(
    ledger: Ledger,
    plan: StepPlan,
    scan: FileScan,
    resumed: LedgerRow | None,
    abandoned: LedgerRow | None,
    ledger_id: int | None,
    output_dir: str,
) -> LedgerRow:
    """Set torn checkpoints aside and write the file's plan to the ledger (main process, before step one).

    Uses the interrupted run's row ``resumed``, or the daemon's claim ``ledger_id``, or adds a
    row (``train.py`` used on its own). An ``abandoned`` plan of another row is marked failed.
    """
    set_aside_torn_checkpoints(output_dir)
    if resumed is not None:
        return resumed
    if abandoned is not None and abandoned.id != ledger_id:
        ledger.fail(abandoned.id, f"abandoned: the running model is at step {plan.start_step}")
    row = ledger.get(ledger_id) if ledger_id is not None else None
    if row is None:
        row = ledger.add(scan.path.name, FileState.QUEUED, scan.sha256, scan.size_bytes)
    return ledger.record_plan(row.id, plan.start_step, plan.planned_steps, plan.replayed_examples)
