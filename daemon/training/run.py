"""One file's run, the one training code path: :class:`FileRun`, ``setup -> fit -> evaluate -> save``.

Used by ``python train.py --dataset FILE`` and by the daemon's training child, both
through :mod:`daemon.training.cli` and :func:`train_file`. :meth:`FileRun.run` reads as:

1. :meth:`FileRun.setup`: scan the file, find the latest complete checkpoint, load or
   bootstrap the model, tokenize, and plan the steps (:func:`daemon.training.prepare.setup`,
   :mod:`daemon.training.plan`); a file whose plan the ledger holds (an interrupted run) keeps
   that plan. Only the datasets cache changes on disk, so a bad file leaves everything as it
   was. Then (main process) torn checkpoints are set aside and the plan is written to the
   ledger (:func:`~daemon.training.plan.commit_plan`), before the first optimizer step.
2. :meth:`FileRun.fit`: ``Trainer.train(resume_from_checkpoint=...)`` once per remaining
   segment (one per epoch, :meth:`StepPlan.segments`) with ``max_steps`` at the
   segment's end and ``ignore_data_skip=True`` (:func:`train_segments`); every end is checked
   and checkpointed, the last one being ``max_steps = start_step + planned_steps``; then the
   cooldown branch (:mod:`daemon.training.cooldown`).
3. :meth:`FileRun.evaluate`: once training and its threads have stopped, the model is scored on
   every slice of the evaluation suite and the quality gate may roll the file back
   (:mod:`daemon.training.evaluation`); nothing is written before :meth:`FileRun.save`.
4. :meth:`FileRun.save`: samples, export to the root of ``output_dir``, evolution snapshot,
   evaluation rows and slice, history row, ledger ``done`` (:mod:`daemon.training.outputs`);
   each may be repeated after a crash. Then the evaluation in TensorBoard, MLflow and W&B, the
   export in the model registry and ``status/report.html``, whose errors are logged only.
5. :meth:`FileRun.fail`, on a user-facing error: the file's steps undone, a ``failed`` row.

This module builds the main line's ``Trainer``; the only other is the cooldown branch's
(:mod:`daemon.training.cooldown`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import (
    TrainerCallback,
)
from transformers.trainer_callback import PrinterCallback

from daemon.config import LEDGER_ENV
from daemon.exceptions import (
    DaemonError,
    DiskFull,
    RegressionError,
    TrainingError,
    TrainingInterrupted,
)
from daemon.store.checkpoints import (
    checkpoint_usage,
    complete_checkpoint_steps,
    space_needed,
)
from daemon.store.durable import disk_full_after
from daemon.store.ledger import Ledger, LedgerRow
from daemon.store.records import HistoryRow, RunState, utc_now
from daemon.store.rollback import finish_interrupted_work, kept_file_ends
from daemon.store.status import Heartbeat, StatusFile, beat
from daemon.store.undo import fail_file
from daemon.training.arguments import Flags
from daemon.training.averaging import average_export
from daemon.training.callbacks import CheckpointCallback, PlanCallback, ProgressCallback, state_bytes
from daemon.training.claims import owning
from daemon.training.cooldown import cool_down
from daemon.training.data import (
    PaddingCollator,
    length_grouped,
    torch_rows,
)
from daemon.training.distillation import teacher_for
from daemon.training.ema import EmaCallback
from daemon.training.evaluation import FileEvaluation, evaluate_file
from daemon.training.outputs import draw_report_unless_supervised, publish, save, start_line
from daemon.training.plan import commit_plan
from daemon.training.prepare import setup
from daemon.training.prepared import PreparedFile
from daemon.training.sharding import (
    consolidated_model,
    fsdp_requested,
    place_gathered,
    refuse_diverging_plans,
    refuse_unsharded,
)
from daemon.training.signals import stop_on_signals
from daemon.training.speed.accumulation import ThreadedAccumulationTrainer, resolve_workers
from daemon.training.speed.allocator import keep_step_memory
from daemon.training.speed.autotune import choose_workers, use_compile_cache
from daemon.training.tensorboard_run import tensorboard_enabled, use_fixed_log_dir
from daemon.training.trackers import follow_runs
from daemon.training.transfer import BeforeScore, score_before, with_before
from daemon.training.wise import wise_export

logger = logging.getLogger(__name__)


def segment_dataset(
    prepared: PreparedFile, epoch: int, first_batch: int, steps: int, seed: int, group_by_length: bool
) -> Any:
    """The examples of one segment: epoch ``epoch``'s order, batches ``first_batch`` to ``+steps``.

    With ``group_by_length`` (``--group_by_length``, the default) epoch ``e``'s order is
    :func:`~daemon.training.data.length_grouped` seeded with ``seed + e``: each optimizer step's rows have
    similar lengths. Without it, epoch 0 is the prepared order (shuffled once with ``seed``) and epoch
    ``e`` reshuffles it with ``seed + e``. Both are deterministic, so a restart sees the same order. Rows
    come as tensors (torch format), which :class:`~daemon.training.data.PaddingCollator` stacks without a
    copy through Python.
    """
    train = prepared.datasets.train
    if group_by_length:
        data = train.select(length_grouped(train, prepared.plan.effective_batch, seed + epoch))
    else:
        data = train if epoch == 0 else train.shuffle(seed=seed + epoch)
    rows = prepared.plan.segment_rows(first_batch, steps)
    data = data if (rows.start, rows.stop) == (0, data.num_rows) else data.select(rows)
    return torch_rows(data)


def build_trainer(
    prepared: PreparedFile, flags: Flags, callbacks: list[TrainerCallback], kept_steps: Iterable[int] = ()
) -> ThreadedAccumulationTrainer:
    """The ``Trainer`` for one file, with ``--grad_workers`` threads; :func:`fit` sets ``max_steps``.

    The product owns checkpoint rotation (:class:`CheckpointCallback`): ``--save_total_limit``
    moves from the Trainer's arguments to that callback, which never deletes the plan's start
    nor ``kept_steps`` (the kept file boundaries, :func:`~daemon.store.rollback.kept_file_ends`).
    """
    training_args = flags.training
    keep, training_args.save_total_limit = training_args.save_total_limit, None
    protected = {prepared.plan.start_step, *kept_steps}
    callbacks = [*callbacks, CheckpointCallback(keep, protected, export_at=prepared.plan.max_steps)]
    precision = "bf16 autocast" if training_args.bf16 else "fp16 autocast" if training_args.fp16 else "fp32"
    logger.info("precision: %s (master weights fp32)", precision)
    if training_args.torch_compile:
        cache = use_compile_cache()
        logger.info("torch.compile: inductor's cache in %s (a model shape's first file compiles)", cache)
    tokenizer = prepared.tokenizer
    workers = resolve_workers(
        flags.accumulation.grad_workers,
        training_args.device.type,
        training_args.world_size,
        prepared.model.num_parameters(),
        measure=lambda workers: choose_workers(
            prepared.model,
            training_args.per_device_train_batch_size,
            flags.data.max_seq_length,
            training_args.bf16,
            workers,
        ),
        compiled=training_args.torch_compile,
        sharded=fsdp_requested(training_args),
    )
    teacher = teacher_for(prepared, flags, prepared.model)  # --replay_distillation; before the Trainer moves the model
    trainer = ThreadedAccumulationTrainer(
        model=prepared.model,
        args=training_args,
        train_dataset=prepared.datasets.train,
        eval_dataset=prepared.datasets.eval,
        processing_class=tokenizer,
        data_collator=PaddingCollator.for_training(tokenizer, training_args, workers),
        callbacks=callbacks,
        grad_workers=workers,
        max_consecutive_skipped_steps=flags.accumulation.max_consecutive_skipped_steps,
    )
    refuse_unsharded(trainer)
    trainer.teacher = teacher
    # ProgressCallback logs one readable line per logging step; the Trainer's
    # printer (used when tqdm is off) would repeat it as a raw dict on stdout.
    trainer.remove_callback(PrinterCallback)
    step = prepared.plan.start_step + prepared.steps_done
    if tensorboard_enabled(training_args):  # one run across files, in status/tensorboard
        use_fixed_log_dir(trainer, flags.status.status_dir, prepared.progress.name, step)
    follow_runs(trainer, flags.status.status_dir, step)  # MLflow and W&B: one run across files too
    return trainer


def train_segments(
    trainer: ThreadedAccumulationTrainer,
    prepared: PreparedFile,
    stop_requested: threading.Event,
    seed: int,
    group_by_length: bool,
) -> tuple[float | None, float]:
    """Train the remaining segments of the plan, each ending on a checkpoint, and verify every end.

    The only place ``max_steps`` is set. The gradient worker threads are joined before
    this returns or raises, so nothing after it (evaluation, generation, export) runs
    beside them, and the model's ``forward`` is its own again (no training autocast).

    Returns:
        ``(mean training loss over the steps trained by this call or None if none were
        left, seconds inside Trainer.train)``: the latter is the Trainer's ``train_runtime``
        summed over the segments.

    Raises:
        TrainingInterrupted: a stop was requested; a checkpoint was saved at the current step.
        TrainingError: a segment ended at another step than planned.
        DiskFull: no room for a checkpoint; the partial folder of a save that failed is removed.
    """
    keep_step_memory()  # the steps' freed blocks stay mapped from here on (its docstring says why not before)
    plan = prepared.plan
    step = plan.start_step + prepared.steps_done
    resume = prepared.checkpoint.path if prepared.checkpoint else None
    loss_sum, trained, seconds = 0.0, 0, 0.0
    output_dir = str(trainer.args.output_dir)
    try:
        for epoch, first_batch, steps in plan.segments(prepared.steps_done):
            trainer.train_dataset = segment_dataset(prepared, epoch, first_batch, steps, seed, group_by_length)
            trainer.args.max_steps = step + steps
            needed = lambda: space_needed(  # noqa: E731 - asked only when a save failed
                output_dir, trainer.state.global_step == plan.max_steps, state_bytes(trainer.model, trainer.optimizer)
            )
            with disk_full_after(output_dir, needed, lambda: complete_checkpoint_steps(output_dir), "a checkpoint"):
                output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            reached = trainer.state.global_step
            seconds += output.metrics.get("train_runtime", 0.0)
            if reached < step + steps and stop_requested.is_set():
                raise TrainingInterrupted(f"stopped at step {reached} of {plan.max_steps}; checkpoint saved")
            if reached != step + steps:
                raise TrainingError(f"training ended at global_step {reached}, planned {step + steps}")
            loss_sum, trained, step = loss_sum + output.training_loss * steps, trained + steps, reached
            resume = Path(str(trainer.args.output_dir)) / f"checkpoint-{step}"
            if stop_requested.is_set() and step < plan.max_steps:
                raise TrainingInterrupted(f"stopped at step {step} of {plan.max_steps}; checkpoint saved")
    finally:
        trainer.release_model()
    return (loss_sum / trained if trained else None), seconds


class FileRun:
    """One file's run and what its phases share: ``setup -> fit -> evaluate -> save`` (:meth:`run`).

    The status, its heartbeat and the ledger's writes are the main process's; every rank trains
    and stops together.

    Args:
        flags: the run's flags.
    """

    def __init__(self, flags: Flags) -> None:
        self.flags = flags
        self.is_main = flags.training.process_index == 0
        self.status = StatusFile(flags.status.status_dir) if self.is_main else None
        self.heartbeat = Heartbeat(self.status, flags.status.status_interval) if self.status else None
        self.name = Path(flags.data.dataset or "").name
        self.started = time.monotonic()
        self.stop_requested = threading.Event()
        # The daemon's ledger, for its child: any other is refused (LedgerReplaced).
        self.ledger = Ledger(flags.status.status_dir, instance=os.environ.get(LEDGER_ENV))
        self.prepared: PreparedFile | None = None
        self.entry: LedgerRow | None = None
        self.before: BeforeScore | None = None  # the own slice scored before the first step (forward transfer)

    def run(self) -> HistoryRow:
        """Train, evaluate and record the file; see :func:`train_file` for what it returns and raises."""
        try:
            if self.heartbeat:
                # progress now: a scrape never reads a working state with the last file's progress_at
                beat(self.heartbeat, state=RunState.LOADING, current_file={"name": self.name}, disk=None)
                self.heartbeat.start()
            with stop_on_signals(self.stop_requested):
                prepared = self.setup()
                train_loss, train_seconds, cooldown_seconds = self.fit(prepared)
            scored = self.evaluate(prepared, train_seconds)
            cooled = cooldown_seconds if prepared.progress.cooldown_steps else None
            row = HistoryRow.done(
                prepared.progress,
                self.started,
                train_seconds,
                train_loss,
                scored.eval_loss,
                scored.seconds,
                scored.quality_gate,
                cooled,
            )
            if self.is_main:
                self.save(prepared, row, scored)
            return row
        except TrainingInterrupted:
            beat(self.heartbeat, state=RunState.STOPPED)
            raise
        except DiskFull as e:  # the file stays unfinished: a run once space is freed resumes it (docs/guarantees.md)
            disk = {"path": e.path, "needed_bytes": e.needed, "free_bytes": e.free, "at": utc_now()}
            step = e.resume_step if e.resume_step is not None else 0
            beat(self.heartbeat, state=RunState.STOPPED, disk=disk, global_step=step)
            raise
        except DaemonError as e:
            self.fail(e)
            raise
        finally:
            if self.heartbeat:
                self.heartbeat.stop()

    def setup(self) -> PreparedFile:
        """Prepare the file (:func:`~daemon.training.prepare.setup`), then commit its plan before step one."""
        flags = self.flags
        self.prepared = prepared = setup(flags, self.ledger, self.heartbeat)
        refuse_diverging_plans(prepared.plan, prepared.scan.sha256)  # every rank, before the plan is committed
        if self.is_main:
            self.entry = commit_plan(
                self.ledger,
                prepared.plan,
                prepared.scan,
                prepared.resumed,
                prepared.abandoned,
                flags.status.ledger_id,
                str(flags.training.output_dir),
            )
            if prepared.checkpoint is None:  # the model's line starts: where from, and what its base knew
                start_line(prepared, flags)
        progress = prepared.progress.as_dict()
        beat(self.heartbeat, state=RunState.TRAINING, max_steps=prepared.plan.max_steps, current_file=progress)
        return prepared

    def fit(self, prepared: PreparedFile) -> tuple[float | None, float, float]:
        """Train the plan's remaining steps, then the cooldown branch (:func:`train_segments`, :func:`cool_down`);
        the file's own slice is scored first (:func:`~daemon.training.transfer.score_before`) and an averaged
        export replaces the model last (:func:`~daemon.training.averaging.average_export`), or its interpolation
        with the pretrained base (:func:`~daemon.training.wise.wise_export`).

        Returns:
            ``(mean training loss or None, seconds in Trainer.train, seconds of the cooldown branch)``.
        """
        flags = self.flags
        kept = kept_file_ends(self.ledger, flags.training.keep_file_checkpoints)
        saving = PlanCallback(self.stop_requested, flags.training.max_save_overhead)
        averaging = flags.averaging
        keeps_ema = averaging.average_exports == "ema" and self.is_main  # the main process saves checkpoints
        ema = [EmaCallback(prepared.model, averaging.ema_decay)] if keeps_ema else []
        trainer = build_trainer(prepared, flags, [saving, *ema], kept)  # the average is saved before the commit
        trainer.add_callback(ProgressCallback(self.heartbeat, prepared.plan, prepared.progress, trainer.guard))
        if self.is_main:  # on its device now, before its first step: what the model knew of the file
            self.before = score_before(prepared, flags, self.entry.id if self.entry else None)
        train_loss, train_seconds = train_segments(
            trainer, prepared, self.stop_requested, flags.training.seed, flags.data.group_by_length
        )
        sharded = trainer.is_fsdp_enabled
        if sharded:  # every rank gathers; the main process evaluates and exports the whole model
            prepared.model = consolidated_model(trainer, prepared.model)
        del trainer  # the main line's Trainer holds the model; the branch copies it
        if sharded:
            place_gathered(prepared.model, flags.training)
        cooldown_seconds = cool_down(prepared, flags, self.stop_requested)
        if self.is_main:  # the export's weights: an average of the main line's (--average_exports), or the end's
            # --wise_ft (never with an average): interpolated with the pretrained base
            prepared.averaged = average_export(prepared, flags, self.ledger) or wise_export(prepared, flags)
        return train_loss, train_seconds, cooldown_seconds

    def evaluate(self, prepared: PreparedFile, train_seconds: float) -> FileEvaluation:
        """Score the model on the evaluation suite (main process; other ranks have nothing to record).

        Raises:
            RegressionError: ``--on_regression rollback`` and the file raised the loss on earlier slices.
        """
        beat(self.heartbeat, state=RunState.EVALUATING)
        if not self.is_main:
            return FileEvaluation()
        spent = self.before.seconds if self.before else 0.0
        scored = evaluate_file(prepared, self.flags, train_seconds, spent)
        with_before(scored, self.before, self.flags.status.status_dir, prepared.plan.start_step)
        if prepared.averaged and scored.evaluation is not None:  # the rows score the averaged model
            scored.evaluation.update(prepared.averaged)
        weights = prepared.datasets.replay_weights  # --replay_weighting forgetting: what each file replayed
        recorded = {**prepared.recorded, **({"replay_weights": weights} if weights else {})}
        if recorded and scored.evaluation is not None:
            scored.evaluation.update(recorded)
        return scored

    def save(self, prepared: PreparedFile, row: HistoryRow, scored: FileEvaluation) -> None:
        """Record the done file (:func:`daemon.training.outputs.save`), then show it idle and published."""
        assert self.status is not None and self.entry is not None
        flags = self.flags
        beat(self.heartbeat, state=RunState.SAVING)
        save(prepared, row, self.status, self.ledger, self.entry, flags, scored)
        usage = checkpoint_usage(str(flags.training.output_dir))  # what the kept checkpoints cost on disk
        step = prepared.plan.max_steps
        beat(self.heartbeat, state=RunState.IDLE, global_step=step, current_file=None, checkpoints=usage)
        publish(flags, step, scored)

    def fail(self, error: DaemonError) -> None:
        """Undo the file's steps and record it failed (a ``failed`` history row, the ledger's row)."""
        prepared, status = self.prepared, self.status
        if self.is_main:
            failing = self.entry if self.entry is not None else self.ledger.get(self.flags.status.ledger_id or -1)
            if failing is not None:
                fail_file(self.ledger, failing, str(error), str(self.flags.training.output_dir))
        if status is not None:
            progress = prepared.progress if prepared else None
            gate = error.quality_gate if isinstance(error, RegressionError) else None
            status.record_outcome(
                HistoryRow.failed(self.name, str(error), progress=progress, started=self.started, quality_gate=gate)
            )
        undone = {"global_step": prepared.plan.start_step} if prepared is not None and self.entry is not None else {}
        beat(self.heartbeat, state=RunState.FAILED, **undone)  # fail_file took the model back to the plan's start
        if status is not None:
            draw_report_unless_supervised(status.dir)


def train_file(flags: Flags) -> HistoryRow:
    """Train one file end to end and record it (status, history, snapshot).

    The run owns its output and status folders and holds its claim on the Arrow cache
    meanwhile (:func:`daemon.training.claims.owning`), whoever calls it: ``train.py``, the daemon's
    child, or a program in-process.

    Returns:
        The file's ``history.jsonl`` row.

    Raises:
        FolderBusy: another daemon or ``train.py`` owns a folder; nothing was written.
        DaemonError: a user-facing failure; a ``failed`` history row has been written
            (except for :class:`TrainingInterrupted`, which leaves the file unfinished).
    """
    with owning(flags):
        finish_interrupted_work(str(flags.training.output_dir), flags.status.status_dir)
        return FileRun(flags).run()
