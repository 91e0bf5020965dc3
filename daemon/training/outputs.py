"""What a done file leaves, and where a new model's line starts: the run's writing phases.

:func:`save` writes a trained and evaluated file's samples, export, evolution snapshot, evaluation
rows and replay share, then its history row and the ledger's ``done``; each may be repeated after a
crash. :func:`start_line` records a new model's origin and its base model's slice before step one;
:func:`publish` shows a done file in TensorBoard, MLflow and W&B, registers its export (``--register_model``)
and draws ``status/report.html``.
"""

from __future__ import annotations

import logging
import os
import time

from daemon.config import SUPERVISOR_ENV
from daemon.store.checkpoints import (
    complete_checkpoint_steps,
    export_bytes,
    export_model,
)
from daemon.store.durable import disk_full_after
from daemon.store.ledger import Ledger, LedgerRow
from daemon.store.origin import record_origin
from daemon.store.records import HistoryRow
from daemon.store.replay import add_file
from daemon.store.status import StatusFile
from daemon.store.undo import undo_after
from daemon.training.arguments import Flags
from daemon.training.base_slice import keep_base_slice
from daemon.training.callbacks import state_bytes
from daemon.training.data import (
    example_lengths,
    replay_examples,
    tokenizer_fingerprint,
)
from daemon.training.evaluation import FileEvaluation, autocast_dtype
from daemon.training.prepared import PreparedFile
from daemon.training.snapshots import GenerationSettings, generate_samples, write_snapshot
from daemon.training.tensorboard_run import end_scalars, log_file_end, tensorboard_enabled
from daemon.training.trackers import log_evaluation, register_published, trackers_enabled
from daemon.views.report import write_report_logged

logger = logging.getLogger(__name__)


def save(
    prepared: PreparedFile,
    row: HistoryRow,
    status: StatusFile,
    ledger: Ledger,
    entry: LedgerRow,
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
            averaged=prepared.averaged,
        )
    exported = time.monotonic()
    folder = write_snapshot(
        flags.status.status_dir,
        prepared.plan.max_steps,
        prepared.scan.path.name,
        row.eval_loss,
        prepared.datasets.eval_examples,
        settings,
        samples,
        scored.snapshot_fields(),
    )
    undo_after(flags.status.status_dir, prepared.plan.start_step)  # left by a killed attempt, or an undone file
    scored.record(flags.status.status_dir, prepared.plan.start_step)
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
    """Add the done file's share of its own training examples to the replay store
    (:func:`daemon.store.replay.add_file`).

    Called only once the file is trained and evaluated (a failed or rolled-back file never
    enters the store), after :func:`~daemon.store.undo.undo_after` dropped the shares of later files.
    """
    status_dir, plan, scan = flags.status.status_dir, prepared.plan, prepared.scan
    own = prepared.datasets.own
    add_file(
        status_dir,
        plan.max_steps,
        scan.path.name,
        scan.sha256,
        tokenizer_fingerprint(prepared.tokenizer),
        example_lengths(own).tolist(),
        lambda indices: replay_examples(own, indices),
        flags.replay.replay_buffer_tokens,
        flags.training.seed,
    )


def start_line(prepared: PreparedFile, flags: Flags) -> None:
    """Record where a new model's line starts (:mod:`daemon.store.origin`) and, for a pretrained base, what it knew.

    The base model's slice (:mod:`daemon.training.base_slice`) is scored by the model as loaded, before any step.
    """
    output_dir, base = str(flags.training.output_dir), flags.base_model()
    record_origin(output_dir, base, flags.model.trust_remote_code)
    if base is not None:
        autocast = autocast_dtype(flags.training.bf16, flags.training.fp16)
        status_dir, length = flags.status.status_dir, flags.data.max_seq_length
        keep_base_slice(prepared.model, prepared.tokenizer, status_dir, length, autocast)


def publish(flags: Flags, step: int, scored: FileEvaluation) -> None:
    """After a done file (main process): its evaluation in TensorBoard, MLflow and W&B (``--report_to``), the export
    in the model registry (``--register_model``), the report.

    None may fail the file, which is recorded by now: their errors are logged. Under the
    daemon the report is left to it (:meth:`~daemon.service.supervisor.ProcessSupervisor.refresh_report`),
    so that the next file does not wait for the plots.
    """
    if tensorboard_enabled(flags.training):
        log_file_end(flags.status.status_dir, step, scored)
    trackers = trackers_enabled(flags.training)
    if trackers:
        log_evaluation(flags.status.status_dir, trackers, step, end_scalars(scored))
    if flags.trackers.register_model:
        register_published(flags, step, scored)
    draw_report_unless_supervised(flags.status.status_dir)


def draw_report_unless_supervised(status_dir: str | os.PathLike[str]) -> None:
    """Rewrite ``status/report.html`` here, unless a daemon runs this process: it draws the report itself."""
    if not os.environ.get(SUPERVISOR_ENV):
        write_report_logged(status_dir)
