"""TensorBoard as one continuous run across files (``--report_to tensorboard``; docs/operating.md "Seeing it").

Every file's training process writes into the same folder, ``<status_dir>/tensorboard``,
instead of the Trainer's new ``<output_dir>/runs/<date>_<host>`` per process, so the run
never splits: TensorBoard reads all event files of a folder as one run, ordered by step.

- ``train/loss``, ``train/learning_rate``, ``train/grad_norm``: the Trainer's own
  ``TensorBoardCallback``, at ``state.global_step``, which continues from the checkpoint a
  file resumes from, so the steps of file 2 follow those of file 1.
- ``file/index`` (scalar) and ``file/name`` (text) at the step each file starts: the boundaries.
- at each done file's end step: ``eval/<slice>/loss`` and ``eval/<slice>/bits_per_byte`` for every
  slice of the evaluation suite, ``eval/own_slice_loss``, ``forgetting/mean``, ``forgetting/max``,
  ``forgetting/backward_transfer``, ``quality_gate/regression`` and ``forward_transfer/before_loss``,
  ``/learned``, ``/forward_transfer``, ``/mean`` (nats; :mod:`daemon.quality.transfer`).

A file that starts below the last step written (a resume after a crash, a failed file's
steps trained again, a rollback) purges the events after its start, as a restarted run
does with ``SummaryWriter(purge_step=...)``, so the plots show the running model's line only.
Only the main process writes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainingArguments
from transformers.integrations import TensorBoardCallback

from daemon.store.status import read_history, standing_done_rows

if TYPE_CHECKING:
    from transformers import Trainer

    from daemon.training.evaluation import FileEvaluation

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"


def tensorboard_dir(status_dir: str | Path) -> Path:
    """The one folder every file's events go to: ``<status_dir>/tensorboard``."""
    return Path(status_dir) / TENSORBOARD_DIR


def tensorboard_enabled(args: TrainingArguments) -> bool:
    """Whether ``--report_to`` asks for TensorBoard (``tensorboard`` or ``all``)."""
    report_to = args.report_to if isinstance(args.report_to, list) else [args.report_to]
    return "tensorboard" in report_to or "all" in report_to


def use_fixed_log_dir(trainer: Trainer, status_dir: str | Path, file_name: str, step: int) -> None:
    """Make the Trainer's ``TensorBoardCallback`` write to :func:`tensorboard_dir`, marking the file's start.

    transformers 5 has no ``logging_dir`` argument: the callback reads ``TENSORBOARD_LOGGING_DIR``
    or makes a new folder per process. Here the main process opens the writer itself and hands
    it to the callback, so its event file starts with the purge of the steps after ``step``
    and with ``file/index`` and ``file/name`` at ``step``, before the file's first loss.

    Args:
        trainer: the file's Trainer, built with ``--report_to tensorboard``.
        status_dir: the status folder.
        file_name: the file being trained.
        step: ``global_step`` where this process starts training it (a resumed file: mid-plan).
    """
    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)), None)
    if callback is None:
        return
    folder = tensorboard_dir(status_dir)
    callback.logging_dir = str(folder)  # also for later segments: the callback closes its writer after each
    if trainer.args.process_index != 0:
        return
    from torch.utils.tensorboard import SummaryWriter

    index = len(standing_done_rows(read_history(status_dir))) + 1
    # Events above ``step`` belong to a line the model has left (a crash, a failed file, a rollback);
    # TensorBoard drops them when it reads this file's purge mark.
    writer = SummaryWriter(str(folder), purge_step=step + 1)
    writer.add_scalar("file/index", index, step)
    writer.add_text("file/name", f"{index}: {file_name}", step)
    callback.tb_writer = writer


def log_file_end(status_dir: str | Path, step: int, scored: FileEvaluation) -> None:
    """Write a done file's evaluation suite, forgetting and quality gate as scalars at ``step``.

    Errors are logged, never raised: the file is recorded by now.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tensorboard_dir(status_dir)))
        try:
            for name, value in end_scalars(scored).items():
                writer.add_scalar(name, value, step)
        finally:
            writer.close()
    except Exception:  # an event file that cannot be written must not fail a trained file
        logger.exception("could not write the evaluation to %s", tensorboard_dir(status_dir))


def end_scalars(scored: FileEvaluation) -> dict[str, float]:
    """A done file's evaluation suite, forgetting and quality gate as named scalars (losses in nats; None left out).

    The names every run uses: TensorBoard here, MLflow and W&B (:mod:`daemon.training.trackers`).
    """
    scalars: dict[str, Any] = {"eval/own_slice_loss": scored.eval_loss}
    for row in scored.rows:
        scalars[f"eval/{row['slice']}/loss"] = row["loss"]
        scalars[f"eval/{row['slice']}/bits_per_byte"] = row["bits_per_byte"]
    forgetting = scored.forgetting or {}
    for key in ("mean", "max", "backward_transfer"):
        scalars[f"forgetting/{key}"] = forgetting.get(key)
    scalars["quality_gate/regression"] = (scored.quality_gate or {}).get("regression")
    transfer = scored.forward_transfer or {}
    for key in ("before_loss", "learned", "forward_transfer", "mean"):
        scalars[f"forward_transfer/{key}"] = transfer.get(key)
    return {name: float(value) for name, value in scalars.items() if value is not None}
