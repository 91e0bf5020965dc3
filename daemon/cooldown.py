"""Cooldown exports: the learning-rate decay of the short branch trained after a file (README "Cooldown exports").

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

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import TrainingArguments

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
