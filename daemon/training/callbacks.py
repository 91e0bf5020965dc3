"""Trainer callbacks of a file's run: where a segment ends, and the live progress.

- :class:`PlanCallback` checkpoints and stops at the end of each planned segment,
  or at the next optimizer step after a stop request (all processes at once).
- :class:`ProgressCallback` feeds the status heartbeat and logs one line per logging step.
- :class:`CheckpointCallback` checks for room before each save, commits each saved checkpoint
  (:mod:`daemon.store.durable`) and rotates by step.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainingArguments

from daemon.exceptions import DiskFull
from daemon.store.checkpoints import complete_checkpoint_steps, rotate_checkpoints, space_needed
from daemon.store.durable import commit_checkpoint, free_bytes
from daemon.store.records import FileProgress
from daemon.store.sharded_files import is_sharded_checkpoint
from daemon.store.status import Heartbeat, mark_progress
from daemon.training.plan import StepPlan
from daemon.training.sharding import write_description
from daemon.training.speed.accumulation import GuardCounters

logger = logging.getLogger(__name__)


class PlanCallback(TrainerCallback):
    """Checkpoints at the end of every segment (and so of the file), or early on a stop request.

    The periodic ``--save_steps`` checkpoints are held to ``max_save_overhead`` of the training
    time: one is skipped while the last checkpoint (its write, fsync and rotation, timed up to the
    next step) took longer than that share of the time trained since it: where a checkpoint is cheap
    (a small model on a CPU) none is skipped; where it is dear (a large model's optimizer state on a
    fast GPU, BENCHMARKS.md, GPU) fewer are written. A crash loses at most the steps since the last
    checkpoint, as before; only their number follows the machine's cost.

    Args:
        stop_requested: set by the SIGINT/SIGTERM handler; the run checkpoints at the
            next optimizer step and stops.
        max_save_overhead: the share (0 to 1) of training time periodic checkpoints may take;
            0 keeps every one. Processes of a distributed run keep every one (they must agree).
    """

    def __init__(self, stop_requested: threading.Event, max_save_overhead: float = 0.0) -> None:
        self.stop_requested = stop_requested
        self.max_save_overhead = max_save_overhead
        self._last_save_seconds: float | None = None  # None until this process has checkpointed
        self._saved_at = time.monotonic()
        self._save_started: float | None = None

    def _stop_everywhere(self, args: TrainingArguments) -> bool:
        """Whether any process got a stop signal; all processes must stop at the same step."""
        if args.world_size <= 1:
            return self.stop_requested.is_set()
        flag = torch.tensor([1.0 if self.stop_requested.is_set() else 0.0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one scalar per step: negligible next to the gradients
        if flag.item() > 0:
            self.stop_requested.set()
        return self.stop_requested.is_set()

    def _save_too_costly(self, args: TrainingArguments) -> bool:
        if not self.max_save_overhead or args.world_size > 1 or self._last_save_seconds is None:
            return False
        return self._last_save_seconds > self.max_save_overhead * (time.monotonic() - self._saved_at)

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed Trainer takes logging/eval/save_steps from the checkpoint's trainer state, so the
        # first file's values would hold forever; this run's flags win.
        state.compute_steps(args, state.max_steps)
        self._saved_at = time.monotonic()
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        if self._save_started is not None:  # the checkpoint and every on_save callback are done
            self._saved_at = time.monotonic()
            self._last_save_seconds = self._saved_at - self._save_started
            self._save_started = None
        return control

    def on_step_end(self, args, state, control, **kwargs):
        # state.max_steps is the current segment's end (fit() sets args.max_steps per segment).
        if state.global_step >= state.max_steps or self._stop_everywhere(args):
            control.should_save = True
            control.should_training_stop = True
        elif control.should_save and self._save_too_costly(args):  # a --save_steps checkpoint
            control.should_save = False
            logger.info(
                "step %d: no checkpoint (the last one took %.1f s: over --max_save_overhead %g "
                "of the %.0f s trained since it)",
                state.global_step,
                self._last_save_seconds,
                self.max_save_overhead,
                time.monotonic() - self._saved_at,
            )
        if control.should_save:
            self._save_started = time.monotonic()
        return control


class BranchCallback(TrainerCallback):
    """The cooldown branch's callback: marks progress every step and stops on a stop request, never saving.

    Args:
        stop_requested: set by the SIGINT/SIGTERM handler.
    """

    def __init__(self, stop_requested: threading.Event) -> None:
        self.stop_requested = stop_requested

    def on_step_end(self, args, state, control, **kwargs):
        mark_progress()
        control.should_save = False  # the branch lives only in memory until it is exported
        if self.stop_requested.is_set():
            control.should_training_stop = True
        return control


class CheckpointCallback(TrainerCallback):
    """Room before each save, then after it (main process): commit the checkpoint and rotate by step.

    The Trainer's own rotation is turned off (it orders by modification time). Before a save
    the output folder must have the bytes of :func:`~daemon.store.checkpoints.space_needed` free
    (the last checkpoint's, plus the export's at ``export_at``); otherwise the run stops with
    :class:`~daemon.exceptions.DiskFull` before writing anything.

    Args:
        keep: complete checkpoints to keep (``--save_total_limit``; None keeps all).
        protected_steps: checkpoints never rotated away: the file's start and the ends of
            the last ``--keep_file_checkpoints`` done files (the kept file boundaries).
        export_at: the step whose save an export follows (the file's end); None for none.
    """

    def __init__(self, keep: int | None, protected_steps: set[int], export_at: int | None = None) -> None:
        self.keep = keep
        self.protected_steps = protected_steps
        self.export_at = export_at

    def on_step_end(self, args, state, control, **kwargs):
        # Runs after PlanCallback (added before it): should_save is final here.
        if control.should_save and state.is_world_process_zero:
            estimate = state_bytes(kwargs.get("model"), kwargs.get("optimizer"))
            needed = space_needed(args.output_dir, state.global_step == self.export_at, estimate)
            free = free_bytes(args.output_dir)
            if free < needed:
                steps = complete_checkpoint_steps(args.output_dir)
                what = f"checkpoint-{state.global_step}"
                raise DiskFull(args.output_dir, needed, free, what, steps[0] if steps else None)
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = f"{args.output_dir}/checkpoint-{state.global_step}"
            if is_sharded_checkpoint(folder):  # FSDP's shards: the Trainer saved no config nor tokenizer
                write_description(folder, kwargs["model"], kwargs.get("processing_class"))
            commit_checkpoint(folder, state.global_step)
            rotate_checkpoints(str(args.output_dir), self.keep, self.protected_steps)
        return control


def state_bytes(model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the model's parameters and the optimizer's state tensors: a checkpoint's size before the first.

    Returns:
        Bytes (0 for what is None).
    """
    tensors: list[torch.Tensor] = list(model.parameters()) if model is not None else []
    if optimizer is not None:
        tensors += [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


class ProgressCallback(TrainerCallback):
    """Feeds the heartbeat with progress and metrics, and logs one line per logging step.

    Only in-memory updates happen here; the heartbeat thread writes the status file and
    appends each logged loss to ``status/loss.jsonl``.
    """

    def __init__(
        self, heartbeat: Heartbeat | None, plan: StepPlan, progress: FileProgress, guard: GuardCounters
    ) -> None:
        self.heartbeat = heartbeat
        self.guard = guard
        self.last_grad_norm: float | None = None
        self.first_step: int | None = None
        self.plan = plan
        self.progress = progress
        self.tokens_per_step = progress.tokens * plan.epochs / plan.planned_steps
        self.started = time.monotonic()
        self.metrics: dict[str, Any] = {
            "loss": None,
            "learning_rate": None,
            "grad_norm": None,
            "tokens_per_second": None,
        }

    def _steps_done(self, state: Any) -> int:
        return state.global_step - self.plan.start_step

    def on_train_begin(self, args, state, control, **kwargs):
        if self.first_step is None:  # the first segment of this process; a resumed file starts mid-plan
            self.first_step = state.global_step
            self.started = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        done = self._steps_done(state)
        if done == 1 and args.logging_first_step:
            control.should_log = True  # the first step of each file, not only of the model's life
        here = state.global_step - (self.first_step or 0)  # steps trained by this process
        elapsed = time.monotonic() - self.started
        rate = here / elapsed if elapsed > 0 and here > 0 else None
        self.metrics["tokens_per_second"] = round(rate * self.tokens_per_step, 1) if rate else None
        self.progress.advance(done, rate)
        if self.heartbeat is not None:
            self.heartbeat.set(
                progress_at=time.time(),
                global_step=state.global_step,
                current_file=self.progress.as_dict(),
                gradient_guard={**self.guard.as_status(), "last_grad_norm": self.last_grad_norm},
            )

    def on_substep_end(self, args, state, control, **kwargs):
        if self.heartbeat is not None:  # a micro-batch done: progress for the daemon's stall detection
            self.heartbeat.set(progress_at=time.time())

    def on_prediction_step(self, args, state, control, **kwargs):
        mark_progress()  # one evaluation batch: a long evaluation is progress, not a stall

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        for key in ("loss", "learning_rate", "grad_norm"):
            if key in logs:
                self.metrics[key] = logs[key]
        self.last_grad_norm = logs.get("grad_norm", self.last_grad_norm)
        if "loss" in logs:
            logger.info(
                "step %d/%d (%d/%d of this file) loss %.4f lr %.3g grad_norm %s tokens/s %s",
                state.global_step,
                self.plan.max_steps,
                self._steps_done(state),
                self.plan.planned_steps,
                logs["loss"],
                logs.get("learning_rate", float("nan")),
                f"{logs['grad_norm']:.3g}" if "grad_norm" in logs else "-",
                self.metrics["tokens_per_second"],
            )
        if self.heartbeat is not None:
            self.heartbeat.set(metrics=dict(self.metrics))
            if "loss" in logs:  # the report's loss curve (status/loss.jsonl), written by the heartbeat thread
                self.heartbeat.add_loss_point(
                    {
                        "step": state.global_step,
                        "file": self.progress.name,
                        "loss": logs["loss"],
                        "learning_rate": logs.get("learning_rate"),
                        "grad_norm": logs.get("grad_norm"),
                        "tokens_per_second": self.metrics["tokens_per_second"],
                    }
                )
