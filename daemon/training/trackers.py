"""MLflow and Weights & Biases as one continuous run across files (``--report_to mlflow`` / ``wandb``).

The Trainer's own ``MLflowCallback`` and ``WandbCallback`` log the training curves; left alone they
would start a new run in every training process, i.e. one per file. Here each process is pointed at
the one run recorded in ``<status_dir>/trackers.json`` (:mod:`daemon.store.trackers`) through the
variables those callbacks honour, before they start:

- MLflow: ``MLFLOW_TRACKING_URI`` (default ``sqlite:///<status_dir>/mlflow.db``), ``MLFLOW_RUN_ID`` (the run
  is created by the first process, in ``MLFLOW_EXPERIMENT_NAME`` or the default experiment), and
  ``MLFLOW_MAX_LOG_PARAMS=0`` once the first process has logged the parameters: MLflow refuses a
  parameter that changes value (``max_steps`` does, every file), and they are logged once.
- W&B: ``WANDB_RUN_ID`` (drawn once) with ``WANDB_RESUME=allow``, and ``WANDB_DIR`` (default the status
  folder). Offline (``WANDB_MODE=offline``) each process leaves a folder of the same run id, which
  ``wandb sync`` uploads in order as one resumed run. W&B's config is one dict per run: each process
  updates it (``allow_val_change``), so it shows the latest file's values.

The same metrics as the TensorBoard run (:mod:`daemon.training.tensorboard_run`): the Trainer's
``loss``, ``learning_rate``, ``grad_norm`` at ``global_step`` (W&B: ``train/loss`` ... over
``train/global_step``); ``file/index`` at the step each file starts; and at each done file's end step
the evaluation suite, forgetting and the quality gate (``eval/<slice>/loss`` ...), logged by
:func:`log_evaluation` after the gate.

Undone steps are marked, not deleted (neither tracker can delete points of a run): a process that
starts training at step s while the run holds steps up to L > s of a line the model has left (a
rollback, a failed or refused file, a crash after the last checkpoint) logs ``undone/to_step`` = L at
step s, and the run's tag (MLflow) or summary key (W&B) ``undone_steps`` lists every such range.
A point at a step in (s, L] logged before that mark (an earlier timestamp in MLflow, an earlier
``_step`` in W&B) belongs to the undone line; what comes after is the running model's.
Only the main process logs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback, TrainingArguments

from daemon.store.checkpoints import EXPORT_STATE
from daemon.store.registry import register_export
from daemon.store.status import read_history, standing_done_rows
from daemon.store.trackers import default_tracking_uri, read_trackers, update_trackers

if TYPE_CHECKING:
    from transformers import Trainer

    from daemon.training.arguments import Flags
    from daemon.training.evaluation import FileEvaluation

logger = logging.getLogger(__name__)

TRACKERS = ("mlflow", "wandb")
# MLflowCallback's own sanitising of metric names, applied to ours too (slice names come from file names).
_UNSAFE = re.compile(r"[^0-9A-Za-z_\-\. :/]")


def trackers_enabled(args: TrainingArguments) -> list[str]:
    """Which of ``mlflow`` and ``wandb`` ``--report_to`` asks for (``all`` is resolved by TrainingArguments)."""
    report_to = args.report_to if isinstance(args.report_to, list) else [args.report_to]
    return [name for name in TRACKERS if name in report_to or "all" in report_to]


def continue_runs(status_dir: str | Path, trackers: list[str], run_name: str | None = None) -> dict[str, Any]:
    """Point this process's tracker integrations at the one run (the module docstring's variables).

    Call before the Trainer's callbacks start (``Trainer.train``); the first call for a status folder
    creates the MLflow run and draws the W&B run id, and records them.

    Returns:
        The record of ``trackers.json`` after the call.
    """
    record = read_trackers(status_dir)
    if "mlflow" in trackers:
        uri = os.environ.setdefault("MLFLOW_TRACKING_URI", default_tracking_uri(status_dir))
        mine = record.get("mlflow") or {}
        if mine.get("tracking_uri") != uri or not _mlflow_run_alive(uri, mine.get("run_id")):
            given = os.environ.get("MLFLOW_RUN_ID")  # the user's run to adopt, never the recorded one that is gone
            mine = _new_mlflow_run(uri, run_name, given if given != mine.get("run_id") else None)
            record = update_trackers(status_dir, mlflow=mine)
        os.environ["MLFLOW_RUN_ID"] = mine["run_id"]
        if mine.get("params_logged"):
            os.environ["MLFLOW_MAX_LOG_PARAMS"] = "0"
        elif os.environ.get("MLFLOW_MAX_LOG_PARAMS") == "0":  # set here for another run of this process
            del os.environ["MLFLOW_MAX_LOG_PARAMS"]
    if "wandb" in trackers:
        os.environ.setdefault("WANDB_DIR", str(Path(status_dir).resolve()))
        mine = record.get("wandb") or {}
        if not mine.get("run_id"):
            run_id = os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:8]
            mine = {"run_id": run_id, "project": os.environ.get("WANDB_PROJECT", "huggingface")}
            record = update_trackers(status_dir, wandb={**mine, "dir": os.environ["WANDB_DIR"]})
        os.environ["WANDB_RUN_ID"] = mine["run_id"]
        os.environ["WANDB_RESUME"] = "allow"
        os.environ.setdefault("WANDB_PROJECT", mine["project"])
    return record


def _mlflow_run_alive(uri: str, run_id: str | None) -> bool:
    """Whether the recorded run is still in the store (not deleted): a run deleted by hand is started anew."""
    if not run_id:
        return False
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        alive = MlflowClient(tracking_uri=uri).get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        alive = False
    if not alive:
        logger.warning("MLflow: the run %s is gone from %s; a new run starts", run_id, uri)
    return alive


def _new_mlflow_run(uri: str, run_name: str | None, given_run_id: str | None) -> dict[str, Any]:
    """Create the one MLflow run (or adopt ``MLFLOW_RUN_ID`` when the user set one) and describe it."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if given_run_id:
        run = client.get_run(given_run_id)
    else:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
        experiment = client.get_experiment_by_name(name) if name else None
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name) if name else "0"
        run = client.create_run(experiment_id, run_name=run_name)
        client.set_terminated(run.info.run_id, "FINISHED")  # running only while a process trains
    logger.info("MLflow: one run across files, %s in %s", run.info.run_id, uri)
    return {
        "tracking_uri": uri,
        "experiment_id": run.info.experiment_id,
        "run_id": run.info.run_id,
        "params_logged": False,
    }


def follow_runs(trainer: Trainer, status_dir: str | Path, start_step: int) -> None:
    """Hand the file's Trainer to the one run: ids in the environment, then :class:`RunMarks` on it."""
    trackers = trackers_enabled(trainer.args)
    if not trackers:
        return
    if trainer.args.process_index == 0:
        continue_runs(status_dir, trackers, trainer.args.run_name)
    trainer.add_callback(RunMarks(status_dir, trackers, start_step))


class RunMarks(TrainerCallback):
    """After the integrations have started (callbacks run in order; theirs come first): the file's marks.

    At this process's first ``on_train_begin``: ``params_logged`` recorded, ``file/index`` logged at
    ``start_step``, and the undone steps above it marked (module docstring). On every log the step
    reached is recorded as ``logged_to``.

    Args:
        status_dir: the status folder (``trackers.json``, the history).
        trackers: the trackers of ``--report_to`` (:func:`trackers_enabled`).
        start_step: ``global_step`` where this process starts training (a resumed file: mid-plan).
    """

    def __init__(self, status_dir: str | Path, trackers: list[str], start_step: int) -> None:
        self.status_dir = status_dir
        self.trackers = trackers
        self.start_step = start_step
        self.started = False

    def on_train_begin(self, args, state, control, **kwargs):
        if self.started or not state.is_world_process_zero:
            return
        self.started = True
        record = read_trackers(self.status_dir)
        if "mlflow" in self.trackers and not record["mlflow"].get("params_logged"):
            record = update_trackers(self.status_dir, mlflow={**record["mlflow"], "params_logged": True})
        scalars = {"file/index": float(len(standing_done_rows(read_history(self.status_dir))) + 1)}
        logged_to = record.get("logged_to")
        undone = record.get("undone", [])
        if logged_to is not None and logged_to > self.start_step:
            undone = [*undone, [self.start_step + 1, logged_to]]
            scalars["undone/to_step"] = float(logged_to)
            logger.info("trackers: steps %d to %d of the run are undone (marked)", self.start_step + 1, logged_to)
        log_scalars(record, self.trackers, self.start_step, scalars, undone)
        update_trackers(self.status_dir, logged_to=self.start_step, undone=undone)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            update_trackers(self.status_dir, logged_to=state.global_step)


def log_scalars(
    record: dict[str, Any], trackers: list[str], step: int, scalars: dict[str, float], undone: list | None = None
) -> None:
    """Log ``scalars`` at ``step`` to the recorded runs (and, given, the ``undone_steps`` ranges)."""
    ranges = ", ".join(f"{a}-{b}" for a, b in undone) if undone else None
    if "mlflow" in trackers and record.get("mlflow"):
        import mlflow
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        mine = record["mlflow"]
        client = MlflowClient(tracking_uri=mine["tracking_uri"])
        stamp = mlflow.utils.time.get_current_time_millis()
        metrics = [Metric(_UNSAFE.sub("_", k), v, stamp, step) for k, v in scalars.items()]
        client.log_batch(mine["run_id"], metrics=metrics)
        if ranges:
            client.set_tag(mine["run_id"], "undone_steps", ranges)
    if "wandb" in trackers and record.get("wandb"):
        run = _wandb_run(record["wandb"])
        run.log({**scalars, "train/global_step": step})
        if ranges:
            run.summary["undone_steps"] = ranges


def _wandb_run(mine: dict[str, Any]) -> Any:
    """The W&B run of this process (the WandbCallback's), or the recorded run resumed when none is open."""
    import wandb

    if wandb.run is None:
        wandb.init(project=mine["project"], id=mine["run_id"], resume="allow")
    return wandb.run


def log_evaluation(status_dir: str | Path, trackers: list[str], step: int, scalars: dict[str, float]) -> None:
    """A done file's evaluation suite, forgetting and quality gate at its end ``step``; then the runs are closed.

    MLflow's asynchronous metric queue is flushed and the W&B run finished, so a reader (or
    ``wandb sync``) sees the whole file. Errors are logged, never raised: the file is recorded by now.
    """
    try:
        record = read_trackers(status_dir)
        log_scalars(record, trackers, step, scalars)
        update_trackers(status_dir, logged_to=step)
        if "mlflow" in trackers:
            import mlflow

            mlflow.flush_async_logging()
        if "wandb" in trackers:
            import wandb

            wandb.finish()
    except Exception:  # a tracker that cannot be reached must not fail a trained file
        logger.exception("could not log the file's evaluation to %s", ", ".join(trackers))


def register_published(flags: Flags, step: int, scored: FileEvaluation) -> None:
    """Register the export just published as a version of ``--register_model`` (:mod:`daemon.store.registry`).

    Its tags: the standing done files (the history row of this file is written by now), the evaluation's
    scalars and the export's ``cooldown_steps``. Errors are logged, never raised: the file is recorded.
    """
    from daemon.training.tensorboard_run import end_scalars

    status_dir, output_dir = flags.status.status_dir, str(flags.training.output_dir)
    try:
        record = read_trackers(status_dir)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(status_dir)
        mine = record.get("mlflow") or {}
        run_id = mine.get("run_id") if mine.get("tracking_uri") == uri else None
        evaluation = end_scalars(scored)
        tags = {
            "files": [row["file"] for row in standing_done_rows(read_history(status_dir))],
            "eval_loss": scored.eval_loss,
            "forgetting_mean": evaluation.get("forgetting/mean"),
            "quality_gate_regression": evaluation.get("quality_gate/regression"),
            "evaluation": evaluation,
            "cooldown_steps": json.loads((Path(output_dir) / EXPORT_STATE).read_text()).get("cooldown_steps", 0),
        }
        register_export(status_dir, uri, flags.trackers.register_model or "", output_dir, step, tags, run_id)
    except Exception:  # a registry that cannot be reached must not fail a trained file
        logger.exception("could not register the export of step %d as %s", step, flags.trackers.register_model)
