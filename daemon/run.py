"""One file's run, the one training code path: ``setup -> fit -> evaluate -> save``.

Used by ``python train.py --dataset FILE`` and by the daemon's training child, both
through :mod:`daemon.cli`. :func:`train_file` reads as:

1. :func:`setup`: scan the file, find the latest complete checkpoint, load or
   bootstrap the model, tokenize, and plan the steps (:mod:`daemon.plan`); a file
   whose plan the ledger holds (an interrupted run) keeps that plan. Only the
   datasets cache changes on disk, so a bad file leaves everything as it was.
2. :func:`commit_plan` (main process): torn checkpoints are set aside and the plan
   is written to the ledger, before the first optimizer step.
3. :func:`fit`: ``Trainer.train(resume_from_checkpoint=...)`` once per remaining
   segment (one per epoch, :meth:`StepPlan.segments`) with ``max_steps`` at the
   segment's end and ``ignore_data_skip=True``; every end is checked and
   checkpointed, the last one being ``max_steps = start_step + planned_steps``.
4. :func:`evaluate`: once training and its threads have stopped, the model is scored on
   every slice of the evaluation suite and the quality gate may roll the file back
   (:mod:`daemon.evaluation`); nothing is written before :func:`save`.
5. :func:`save`: samples, export to the root of ``output_dir``, evolution snapshot,
   evaluation rows and slice, history row, ledger ``done``; each may be repeated after a crash.
6. :func:`publish`: the evaluation in TensorBoard (``--report_to tensorboard``) and
   ``status/report.html``; a failed file rewrites the report too. Errors there are logged only.

This module builds the main line's ``Trainer``; the only other is the cooldown branch's (:mod:`daemon.cooldown`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
)
from transformers.trainer_callback import PrinterCallback

from daemon.accumulation import ThreadedAccumulationTrainer, resolve_workers
from daemon.adapters import starting_model as adapted_starting_model
from daemon.arguments import Flags
from daemon.autotune import choose_workers, use_compile_cache
from daemon.base_slice import keep_base_slice
from daemon.callbacks import CheckpointCallback, PlanCallback, ProgressCallback, state_bytes
from daemon.checkpoints import (
    Checkpoint,
    checkpoint_usage,
    complete_checkpoint_steps,
    export_bytes,
    export_model,
    fail_file,
    latest_complete_checkpoint,
    space_needed,
)
from daemon.config import LEDGER_ENV, SUPERVISOR_ENV
from daemon.cooldown import cool_down, cooldown_steps
from daemon.data import (
    PaddingCollator,
    PreparedData,
    example_lengths,
    mix_replay,
    prepare_datasets,
    replay_examples,
    tokenizer_fingerprint,
    torch_rows,
)
from daemon.durable import disk_full_after
from daemon.evaluation import FileEvaluation, autocast_dtype, evaluate_file
from daemon.exceptions import (
    ConfigError,
    DaemonError,
    DatasetError,
    DiskFull,
    RegressionError,
    TrainingError,
    TrainingInterrupted,
)
from daemon.jsonl import CHANGED_WHILE_READ, ScanReport, load_records, scan_jsonl
from daemon.ledger import Entry, Ledger
from daemon.locks import owning
from daemon.origin import base_model_of, record_origin
from daemon.plan import StepPlan, commit_plan, plan_steps, recorded_plan
from daemon.reconcile import refuse_missing_steps
from daemon.records import FileProgress, HistoryRow, RunState, utc_now
from daemon.replay import add_file, drop_after, replay_count, select_replay
from daemon.report import write_report_logged
from daemon.rollback import finish_interrupted_rollback, kept_file_ends
from daemon.signals import stop_on_signals
from daemon.snapshots import GenerationSettings, generate_samples, write_snapshot
from daemon.status import Heartbeat, StatusFile
from daemon.tensorboard_run import log_file_end, tensorboard_enabled, use_fixed_log_dir

logger = logging.getLogger(__name__)


@dataclass
class PreparedFile:
    """Everything :func:`setup` prepares for :func:`fit`: one file's data, starting model and plan.

    Attributes:
        model, tokenizer: the model to train (from ``checkpoint`` when there is one).
        datasets: the tokenized training examples and the held-out slice.
        report: what the scan found in the file (sha256, shape, malformed lines).
        checkpoint: the latest complete checkpoint, None for a new model.
        plan: the file's step plan.
        steps_done: steps of the plan already trained (an interrupted file resumes).
        resumed: the ledger row whose plan this run continues, if any.
        abandoned: a ``training`` ledger row of this file whose plan the running model has
            left (e.g. checkpoints were deleted); :func:`commit_plan` closes it.
        progress: the status's ``current_file``.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    datasets: PreparedData
    report: ScanReport
    checkpoint: Checkpoint | None
    plan: StepPlan
    steps_done: int
    resumed: Entry | None
    abandoned: Entry | None
    progress: FileProgress


def setup(flags: Flags, ledger: Ledger, heartbeat: Heartbeat | None) -> PreparedFile:
    """Scan and tokenize the file, pick the starting model and plan the steps; reads the ledger only.

    Raises:
        DatasetError, CheckpointError, ConfigError, TrainingError.
    """
    data_args, training_args = flags.data, flags.training
    assert data_args.dataset is not None
    report = scan_jsonl(data_args.dataset, data_args.text_field, data_args.strict)
    claim = ledger.get(flags.status.ledger_id) if flags.status.ledger_id is not None else None
    if claim is not None and claim.sha256 is not None and claim.sha256 != report.sha256:
        raise DatasetError(
            f"{report.path.name} changed after the daemon claimed it (sha256 {claim.sha256[:12]}... then, "
            f"{report.sha256[:12]}... now): {CHANGED_WHILE_READ.split(': ', 1)[1]}"
        )
    _beat(heartbeat, state=RunState.TOKENIZING)
    records = load_records(report, data_args)
    output_dir = str(training_args.output_dir)
    checkpoint = latest_complete_checkpoint(output_dir, set_aside=False)
    refuse_missing_steps(ledger, output_dir, claim)
    model, tokenizer, checkpoint = adapted_starting_model(flags, checkpoint, records, report.shape)  # --use_peft
    datasets = prepare_datasets(records, report.shape, tokenizer, data_args, training_args.seed)
    at_step = checkpoint.global_step if checkpoint else 0
    resumed, abandoned = recorded_plan(ledger, report, at_step, claim)
    start_step = at_step if resumed is None or resumed.start_step is None else resumed.start_step
    datasets = with_replay(datasets, flags, report, start_step, tokenizer)
    plan = plan_steps(start_step, datasets.examples, training_args, datasets.replayed)
    if resumed and (plan.planned_steps, plan.replayed_examples) != (
        resumed.planned_steps,
        resumed.replayed_examples or 0,
    ):
        raise ConfigError(
            f"{report.path.name} was planned with {resumed.planned_steps} steps ({resumed.replayed_examples or 0} "
            f"replayed examples) and is half trained; these flags give {plan.planned_steps} "
            f"({plan.replayed_examples}): resume it with the batch, epoch and replay flags it started with"
        )
    steps_done = at_step - plan.start_step
    if resumed:
        logger.info(
            "resuming %s at step %d of its plan %d -> %d", report.path.name, at_step, start_step, plan.max_steps
        )
    progress = FileProgress(
        name=report.path.name,
        sha256=report.sha256,
        examples=datasets.examples,
        eval_examples=datasets.eval_examples,
        tokens=datasets.tokens,
        skipped_lines=report.bad_lines,
        start_step=plan.start_step,
        planned_steps=plan.planned_steps,
        steps_done=steps_done,
        replayed_examples=plan.replayed_examples,
        cooldown_steps=cooldown_steps(plan.planned_steps, flags.replay.cooldown_fraction),
    )
    logger.info(
        "%s: %s, %d train examples (%d tokens) + %d replayed, %d held out; effective batch %d = %d x %d x world %d; "
        "steps %d -> %d (%d for this file)",
        report.path.name,
        report.shape,
        datasets.examples,
        datasets.tokens,
        datasets.replayed,
        datasets.eval_examples,
        plan.effective_batch,
        plan.per_device_train_batch_size,
        plan.gradient_accumulation_steps,
        plan.world_size,
        plan.start_step,
        plan.max_steps,
        plan.planned_steps,
    )
    return PreparedFile(model, tokenizer, datasets, report, checkpoint, plan, steps_done, resumed, abandoned, progress)


def with_replay(
    datasets: PreparedData, flags: Flags, report: ScanReport, start_step: int, tokenizer: PreTrainedTokenizerBase
) -> PreparedData:
    """Mix ``--replay_fraction`` of replayed examples into the file's training examples (:mod:`daemon.replay`).

    The selection reads the shares of files done up to ``start_step`` (the ledger plan's, for a
    resumed file) and is seeded by ``--seed``, the file's sha256 and ``start_step``: a resumed
    file replays the same examples in the same order.
    """
    count = replay_count(datasets.examples, flags.replay.replay_fraction)
    if count == 0:
        return datasets
    seed = flags.training.seed
    fingerprint = tokenizer_fingerprint(tokenizer)
    chosen = select_replay(
        flags.status.status_dir, start_step, count, f"{seed}:{report.sha256}:{start_step}", fingerprint
    )
    return mix_replay(datasets, chosen, seed)


def segment_dataset(prepared: PreparedFile, epoch: int, first_batch: int, steps: int, seed: int) -> Any:
    """The examples of one segment: epoch ``epoch``'s order, batches ``first_batch`` to ``+steps``.

    Epoch 0 is the prepared order (shuffled once with ``seed``); epoch ``e`` reshuffles
    it with ``seed + e``. Both are deterministic, so a restart sees the same order. Rows come
    as tensors (torch format), which :class:`~daemon.data.PaddingCollator` stacks without a copy through Python.
    """
    train = prepared.datasets.train
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
    nor ``kept_steps`` (the kept file boundaries, :func:`~daemon.rollback.kept_file_ends`).
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
    )
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
    # ProgressCallback logs one readable line per logging step; the Trainer's
    # printer (used when tqdm is off) would repeat it as a raw dict on stdout.
    trainer.remove_callback(PrinterCallback)
    if tensorboard_enabled(training_args):  # one run across files, in status/tensorboard
        step = prepared.plan.start_step + prepared.steps_done
        use_fixed_log_dir(trainer, flags.status.status_dir, prepared.progress.name, step)
    return trainer


def fit(
    trainer: ThreadedAccumulationTrainer, prepared: PreparedFile, stop_requested: threading.Event, seed: int
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
    plan = prepared.plan
    step = plan.start_step + prepared.steps_done
    resume = prepared.checkpoint.path if prepared.checkpoint else None
    loss_sum, trained, seconds = 0.0, 0, 0.0
    output_dir = str(trainer.args.output_dir)
    try:
        for epoch, first_batch, steps in plan.segments(prepared.steps_done):
            trainer.train_dataset = segment_dataset(prepared, epoch, first_batch, steps, seed)
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


def evaluate(prepared: PreparedFile, flags: Flags, train_seconds: float, is_main: bool) -> FileEvaluation:
    """Score the model on the evaluation suite (main process; other ranks have nothing to record).

    Raises:
        RegressionError: ``--on_regression rollback`` and the file raised the loss on earlier slices.
    """
    return evaluate_file(prepared, flags, train_seconds) if is_main else FileEvaluation()


def save(
    prepared: PreparedFile,
    row: HistoryRow,
    status: StatusFile,
    ledger: Ledger,
    entry: Entry,
    flags: Flags,
    scored: FileEvaluation,
) -> None:
    """Samples, export, snapshot, evaluations, then the records; each step may be repeated after a crash.

    Raises:
        DiskFull: no room for the export; its stage is removed and the file stays unfinished.
    """
    if row.eval_loss is not None:
        status.record_eval(prepared.plan.max_steps, row.file, row.eval_loss)
    samples_args = flags.samples
    settings = GenerationSettings(
        max_new_tokens=samples_args.sample_max_new_tokens,
        temperature=samples_args.sample_temperature,
        top_k=samples_args.sample_top_k,
        seed=flags.training.seed,
    )
    started = time.monotonic()
    samples = generate_samples(prepared.model, prepared.tokenizer, samples_args.sample_prompts, settings)
    sampled = time.monotonic()
    output_dir = str(flags.training.output_dir)
    needed = lambda: export_bytes(output_dir, state_bytes(prepared.model, None))  # noqa: E731 - asked on a failure
    with disk_full_after(output_dir, needed, lambda: complete_checkpoint_steps(output_dir), "the export"):
        export_model(
            prepared.model,
            prepared.tokenizer,
            output_dir,
            prepared.plan.max_steps,
            prepared.progress.cooldown_steps,
            status_dir=flags.status.status_dir,
            finishing=row.as_dict(),  # its history row comes after the export
        )
    exported = time.monotonic()
    folder = write_snapshot(
        flags.status.status_dir,
        prepared.plan.max_steps,
        prepared.report.path.name,
        row.eval_loss,
        prepared.datasets.eval_examples,
        settings,
        samples,
        scored.snapshot_fields(),
    )
    scored.record(flags.status.status_dir, prepared.plan.start_step)  # also drops replay shares above the start
    remember_file(prepared, flags)
    status.update(**scored.status_fields())
    logger.info(
        "exported the model to %s; snapshot in %s (samples %.1f s, export %.1f s, snapshot and replay store %.1f s)",
        output_dir,
        folder,
        sampled - started,
        exported - sampled,
        time.monotonic() - exported,
    )
    status.record_outcome(row)  # before the ledger: a crash in between finishes again without a second row
    ledger.finish(entry.id, prepared.plan.max_steps)


def remember_file(prepared: PreparedFile, flags: Flags) -> None:
    """Add the done file's share of its own training examples to the replay store (:func:`daemon.replay.add_file`).

    Called only once the file is trained and evaluated (a failed or rolled-back file never
    enters the store); shares of files that ended after the file's start are dropped first.
    """
    status_dir, plan, report = flags.status.status_dir, prepared.plan, prepared.report
    drop_after(status_dir, plan.start_step)
    own = prepared.datasets.own
    add_file(
        status_dir,
        plan.max_steps,
        report.path.name,
        report.sha256,
        tokenizer_fingerprint(prepared.tokenizer),
        example_lengths(own).tolist(),
        lambda indices: replay_examples(own, indices),
        flags.replay.replay_buffer_tokens,
        flags.training.seed,
    )


def start_line(prepared: PreparedFile, flags: Flags) -> None:
    """Record where a new model's line starts (:mod:`daemon.origin`) and, for a pretrained base, what it knew.

    The base model's slice (:mod:`daemon.base_slice`) is scored by the model as loaded, before any step.
    """
    output_dir = str(flags.training.output_dir)
    base = base_model_of(output_dir, flags.model.model_name_or_path)
    record_origin(output_dir, base)
    if base is not None:
        autocast = autocast_dtype(flags.training.bf16, flags.training.fp16)
        status_dir, length = flags.status.status_dir, flags.data.max_seq_length
        keep_base_slice(prepared.model, prepared.tokenizer, status_dir, length, autocast)


def train_file(flags: Flags) -> HistoryRow:
    """Train one file end to end and record it (status, history, snapshot).

    The run owns its output and status folders and holds its claim on the Arrow cache
    meanwhile (:func:`daemon.locks.owning`), whoever calls it: ``train.py``, the daemon's
    child, or a program in-process.

    Returns:
        The file's ``history.jsonl`` row.

    Raises:
        FolderBusy: another daemon or ``train.py`` owns a folder; nothing was written.
        DaemonError: a user-facing failure; a ``failed`` history row has been written
            (except for :class:`TrainingInterrupted`, which leaves the file unfinished).
    """
    with owning(flags):
        finish_interrupted_rollback(str(flags.training.output_dir), flags.status.status_dir)
        return _train_file(flags)


def _train_file(flags: Flags) -> HistoryRow:
    is_main = flags.training.process_index == 0
    status = StatusFile(flags.status.status_dir) if is_main else None
    heartbeat = Heartbeat(status, flags.status.status_interval) if status else None
    name = Path(flags.data.dataset or "").name
    started = time.monotonic()
    stop_requested = threading.Event()
    ledger = Ledger(flags.status.status_dir, instance=os.environ.get(LEDGER_ENV))  # the daemon's, for its child
    prepared: PreparedFile | None = None
    entry: Entry | None = None
    try:
        if heartbeat:
            heartbeat.set(state=RunState.LOADING, current_file={"name": name}, disk=None)
            heartbeat.flush()
            heartbeat.start()
        with stop_on_signals(stop_requested):
            prepared = setup(flags, ledger, heartbeat)
            if is_main:
                entry = commit_plan(ledger, prepared, flags.status.ledger_id, str(flags.training.output_dir))
                if prepared.checkpoint is None:  # the model's line starts: where from, and what its base knew
                    start_line(prepared, flags)
            _beat(
                heartbeat,
                state=RunState.TRAINING,
                max_steps=prepared.plan.max_steps,
                current_file=prepared.progress.as_dict(),
            )
            kept = kept_file_ends(ledger, flags.training.keep_file_checkpoints)
            saving = PlanCallback(stop_requested, flags.training.max_save_overhead)
            trainer = build_trainer(prepared, flags, [saving], kept)
            trainer.add_callback(ProgressCallback(heartbeat, prepared.plan, prepared.progress, trainer.guard))
            train_loss, train_seconds = fit(trainer, prepared, stop_requested, flags.training.seed)
            del trainer  # the main line's Trainer holds the model; the branch copies it
            cooldown_seconds = cool_down(prepared, flags, stop_requested)
        _beat(heartbeat, state=RunState.EVALUATING)
        scored = evaluate(prepared, flags, train_seconds, is_main)
        row = HistoryRow.done(
            prepared.progress,
            started,
            train_seconds,
            train_loss,
            scored.eval_loss,
            scored.seconds,
            scored.quality_gate,
            cooldown_seconds if prepared.progress.cooldown_steps else None,
        )
        if is_main:
            assert status is not None and entry is not None
            _beat(heartbeat, state=RunState.SAVING)
            save(prepared, row, status, ledger, entry, flags, scored)
            usage = checkpoint_usage(str(flags.training.output_dir))  # what the kept checkpoints cost on disk
            _beat(
                heartbeat,
                state=RunState.IDLE,
                global_step=prepared.plan.max_steps,
                current_file=None,
                checkpoints=usage,
            )
            publish(flags, prepared.plan.max_steps, scored)
        return row
    except TrainingInterrupted:
        _beat(heartbeat, state=RunState.STOPPED)
        raise
    except DiskFull as e:  # the file stays unfinished: a run once space is freed resumes it (docs/guarantees.md)
        disk = {"path": e.path, "needed_bytes": e.needed, "free_bytes": e.free, "at": utc_now()}
        step = e.resume_step if e.resume_step is not None else 0
        _beat(heartbeat, state=RunState.STOPPED, disk=disk, global_step=step)
        raise
    except DaemonError as e:
        if is_main:
            failing = entry if entry is not None else ledger.get(flags.status.ledger_id or -1)
            if failing is not None:
                fail_file(ledger, failing, str(e), str(flags.training.output_dir))
        if status is not None:
            progress = prepared.progress if prepared else None
            gate = e.quality_gate if isinstance(e, RegressionError) else None
            status.record_outcome(
                HistoryRow.failed(name, str(e), progress=progress, started=started, quality_gate=gate)
            )
        undone = {"global_step": prepared.plan.start_step} if prepared is not None and entry is not None else {}
        _beat(heartbeat, state=RunState.FAILED, **undone)  # fail_file took the model back to the plan's start
        if status is not None:
            _draw_report_unless_supervised(status.dir)
        raise
    finally:
        if heartbeat:
            heartbeat.stop()


def publish(flags: Flags, step: int, scored: FileEvaluation) -> None:
    """After a done file (main process): its evaluation in TensorBoard (``--report_to tensorboard``), the report.

    Neither may fail the file, which is recorded by now: their errors are logged. Under the
    daemon the report is left to it (:meth:`~daemon.supervisor.ProcessSupervisor.refresh_report`),
    so that the next file does not wait for the plots.
    """
    if tensorboard_enabled(flags.training):
        log_file_end(flags.status.status_dir, step, scored)
    _draw_report_unless_supervised(flags.status.status_dir)


def _draw_report_unless_supervised(status_dir: str | os.PathLike[str]) -> None:
    """Rewrite ``status/report.html`` here, unless a daemon runs this process: it draws the report itself."""
    if not os.environ.get(SUPERVISOR_ENV):
        write_report_logged(status_dir)


def _beat(heartbeat: Heartbeat | None, **fields: Any) -> None:
    """Set status fields and write them now, marking progress for the daemon's stall detection."""
    if heartbeat is not None:
        heartbeat.set(progress_at=time.time(), **fields)
        heartbeat.flush()
