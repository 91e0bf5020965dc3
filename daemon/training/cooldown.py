"""Cooldown exports: the learning-rate decay of the short branch trained after a file (docs/data.md "Replay and ...").

With ``--cooldown_fraction C`` the run trains, after a file's last step ``end``, a branch of
``cooldown_steps(planned_steps, C)`` steps from the file's end checkpoint (its optimizer and
scheduler state) into a scratch folder, exports and evaluates that model, and deletes the branch.
The main line (the checkpoints, ``global_step``) never sees it, so the next file continues from
the end checkpoint at the main schedule's learning rate: no jump at the boundary.

The learning rate of the branch's ``k``-th optimizer step (``k = 1 .. n``)::

    lr_k = lr_main(end) x decay(k / (n + 1))
    decay(t) = 1 - t          (linear)
    decay(t) = 1 - sqrt(t)    (1-sqrt, Hagele et al. 2024, arXiv:2405.18392, section 3)

so the rate falls from just under the main line's towards zero, and even a one-step branch
decays (with ``k / n`` a one-step branch would train at the main rate and its last step at 0).

This is warmup-stable-decay for open-ended training: the main line is the stable
phase (``constant_with_warmup``), and every export is the decayed model, without the
re-warming a decayed main line would need at the next file (Ibrahim et al. 2024,
arXiv:2403.08763; MiniCPM, arXiv:2404.06395, which branches its decays from the stable phase
the same way). ``lr_main(end)`` is the main schedule's own value at ``end``, whatever
``--lr_scheduler_type`` is.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedModel, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from daemon.exceptions import TrainingError, TrainingInterrupted
from daemon.store.adapter_files import is_peft_model
from daemon.training.callbacks import BranchCallback
from daemon.training.cooldown_mix import cooldown_examples
from daemon.training.data import PaddingCollator, torch_rows
from daemon.training.speed.accumulation import ThreadedAccumulationTrainer, resolve_workers
from daemon.training.trackers import TRACKERS

if TYPE_CHECKING:
    from daemon.training.arguments import Flags
    from daemon.training.prepared import PreparedFile

logger = logging.getLogger(__name__)

COOLDOWN_DIR = ".cooldown"  # scratch folder of the branch inside --output_dir (not a checkpoint name)


def cooldown_steps(planned_steps: int, fraction: float) -> int:
    """Steps of the branch: ``ceil(fraction * planned_steps)``, 0 when ``fraction`` is 0.

    Args:
        planned_steps: the file's main-line steps.
        fraction: ``--cooldown_fraction``.
    """
    return math.ceil(fraction * planned_steps) if fraction > 0 else 0


def decay(t: float, shape: str) -> float:
    """The decay factor at ``t`` in [0, 1] of the branch (1 at its start, 0 at its end).

    Raises:
        ValueError: an unknown ``shape``.
    """
    t = min(1.0, max(0.0, t))
    if shape == "linear":
        return 1.0 - t
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(t)
    raise ValueError(f"unknown cooldown shape {shape!r}")


def main_factor(args: TrainingArguments, step: int) -> float:
    """The main line's learning-rate factor (of ``--learning_rate``) at ``step``, as its scheduler computes it.

    The main scheduler is rebuilt the way ``Trainer.create_scheduler`` builds it, with
    ``num_training_steps = step`` (the file's ``max_steps``); a scheduler without a per-step
    factor (``reduce_lr_on_plateau``) counts as 1.
    """
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(step),
        num_training_steps=step,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs if isinstance(args.lr_scheduler_kwargs, dict) else {},
    )
    lambdas = getattr(scheduler, "lr_lambdas", None)
    return float(lambdas[0](step)) if lambdas else 1.0


def branch_lambda(start: float, end_step: int, steps: int, shape: str) -> Callable[[int], float]:
    """The branch's ``LambdaLR`` factor at ``global_step`` ``s``: the update from ``s`` to ``s + 1``.

    ``start x decay((s - end_step + 1) / (steps + 1))``: the ``k``-th step of the branch
    (``s = end_step + k - 1``) gets ``decay(k / (steps + 1))`` (module docstring).
    """

    def factor(step: int) -> float:
        return start * decay((step - end_step + 1) / (max(1, steps) + 1), shape)

    return factor


class CooldownTrainer(ThreadedAccumulationTrainer):
    """The branch's Trainer: the main line's optimizer state, a learning rate decaying to zero.

    Args:
        lr_lambda: the factor of ``--learning_rate`` at each ``global_step``
            (:func:`daemon.training.cooldown.branch_lambda`).
    """

    def __init__(self, *args: Any, lr_lambda: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lr_lambda = lr_lambda

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        import torch

        if self.lr_scheduler is None:
            target = optimizer or self.optimizer
            assert target is not None
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(target, self.lr_lambda)
        return self.lr_scheduler

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # The checkpoint's optimizer holds the main line's rate, used by the first step before the
        # scheduler steps; set it to the branch's own (the lambdas of a LambdaLR are not saved).
        super()._load_optimizer_and_scheduler(checkpoint)
        step = self.state.global_step
        assert self.optimizer is not None and self.lr_scheduler is not None
        for group, base in zip(self.optimizer.param_groups, self.lr_scheduler.base_lrs, strict=True):
            group["lr"] = base * self.lr_lambda(step)


def cool_down(prepared: PreparedFile, flags: Flags, stop_requested: threading.Event) -> float:
    """Train the cooldown branch from the file's end checkpoint; ``prepared.model`` becomes the cooled model.

    The branch trains ``prepared.progress.cooldown_steps`` steps on a seeded sample of the
    file's training examples (its own and replayed ones), or with ``--cooldown_mix balanced`` on
    an even mix of the replay store's shares and the file (:mod:`daemon.training.cooldown_mix`),
    into ``<output_dir>/.cooldown``, which is deleted afterwards: the main line's checkpoints and
    ``global_step`` never change.

    Returns:
        Seconds inside ``Trainer.train`` (0 with no branch).

    Raises:
        TrainingInterrupted: a stop was requested (the main line's end is checkpointed: a rerun redoes the branch).
        TrainingError: the branch ended at another step than planned.
    """
    steps, plan = prepared.progress.cooldown_steps, prepared.plan
    if steps == 0:
        return 0.0
    if stop_requested.is_set():
        raise TrainingInterrupted(f"stopped before the cooldown; the file ended at step {plan.max_steps}")
    main_args = flags.training
    scratch = Path(str(main_args.output_dir)) / COOLDOWN_DIR
    shutil.rmtree(scratch, ignore_errors=True)
    args = copy.copy(main_args)
    args.output_dir, args.max_steps, args.save_strategy = str(scratch), plan.max_steps + steps, "no"
    # The branch's steps are not the main line's: kept out of the one MLflow / W&B run (daemon.training.trackers),
    # which would chart them above the file's end and see its parameters (max_steps) change.
    args.report_to = [name for name in args.report_to or [] if name not in TRACKERS]
    factor = branch_lambda(main_factor(main_args, plan.max_steps), plan.max_steps, steps, flags.replay.cooldown_shape)
    train = torch_rows(cooldown_examples(prepared, flags, steps * plan.effective_batch))  # --cooldown_mix
    workers = resolve_workers(
        flags.accumulation.grad_workers,
        args.device.type,
        args.world_size,
        prepared.model.num_parameters(),
        compiled=args.torch_compile,
    )
    trainer = CooldownTrainer(
        model=copy.deepcopy(prepared.model),
        args=args,
        train_dataset=train,
        processing_class=prepared.tokenizer,
        data_collator=PaddingCollator.for_training(prepared.tokenizer, args, workers),
        callbacks=[BranchCallback(stop_requested)],
        grad_workers=workers,
        max_consecutive_skipped_steps=flags.accumulation.max_consecutive_skipped_steps,
        lr_lambda=factor,
    )
    trainer.remove_callback(PrinterCallback)
    try:
        output = trainer.train(
            resume_from_checkpoint=str(Path(str(main_args.output_dir)) / f"checkpoint-{plan.max_steps}")
        )
    finally:
        trainer.release_model()
        shutil.rmtree(scratch, ignore_errors=True)
    if trainer.state.global_step != plan.max_steps + steps:
        if stop_requested.is_set():
            raise TrainingInterrupted(f"stopped during the cooldown; the file ended at step {plan.max_steps}")
        raise TrainingError(f"the cooldown ended at step {trainer.state.global_step}, planned {plan.max_steps + steps}")
    assert isinstance(trainer.model, PreTrainedModel) or is_peft_model(trainer.model)  # --use_peft: a PeftModel
    prepared.model = trainer.model  # type: ignore[assignment]
    logger.info(
        "cooldown: %d steps (%s) from step %d; exporting the cooled model",
        steps,
        flags.replay.cooldown_shape,
        plan.max_steps,
    )
    return float(output.metrics.get("train_runtime", 0.0))
