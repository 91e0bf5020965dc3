"""The exponential moving average of the weights, kept exactly across checkpoints (``--average_exports ema``).

After the ``n``-th optimizer step of the main line the average takes in (weights ``w_n``), for
every parameter::

    ema_n = ema_(n-1) + (1 - decay) / (1 - decay^n) x (w_n - ema_(n-1))     (fp32; ``decay``: ``--ema_decay``)

the bias-corrected exponential moving average ``m_n / (1 - decay^n)`` of ``m_n = decay x m_(n-1) +
(1 - decay) x w_n``, ``m_0 = 0`` (Kingma and Ba 2015, "Adam", arXiv:1412.6980, section 3): a weighted
mean of the weights after steps 1..n, with weights ``decay^(n-i)``. So ``ema_1 = w_1``, and the
weights the average starts from (a new line's random initialisation) count for nothing, where the
uncorrected update ``ema_n = decay x ema_(n-1) + (1 - decay) x w_n`` kept them at ``decay^n`` (0.59
after a five-step first file at 0.9). Long after the start the two are the same update (Polyak
averaging with an exponential window, as in Kaddour 2022, arXiv:2209.14981, section 2, and Sanyal
et al. 2023, arXiv:2306.03241; torch's ``swa_utils.get_ema_multi_avg_fn``).

The average starts at the first step the option sees: a new line's, or a checkpoint's saved
without one. Every checkpoint holds the average of its step and its ``n`` (``ema.safetensors``, ``n``
in the file's metadata as ``steps``; written before the checkpoint's commit marker, so it is part of
what makes the checkpoint complete), and a run that resumes from a checkpoint resumes its average:
a resumed file ends with the same average as one trained straight through. An average saved
without ``steps`` continues with the uncorrected update. The average of the file's end checkpoint
is what :func:`daemon.training.averaging.average_export` exports.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from daemon.store.checkpoints import EMA_FILE

logger = logging.getLogger(__name__)


STEPS_KEY = "steps"  # the ema file's metadata: the optimizer steps the average has taken in


def read_ema(folder: Path) -> dict[str, torch.Tensor] | None:
    """The average kept in a checkpoint folder (CPU tensors by parameter name), None if it holds none."""
    from safetensors.torch import load_file

    path = folder / EMA_FILE
    return load_file(path) if path.is_file() else None


def ema_steps(folder: Path) -> int | None:
    """The steps the average in ``folder`` has taken in (its ``n``), None if unrecorded (an older checkpoint's)."""
    from safetensors import safe_open

    with safe_open(folder / EMA_FILE, framework="pt") as f:
        steps = (f.metadata() or {}).get(STEPS_KEY)
    return int(steps) if steps is not None else None


class EmaCallback(TrainerCallback):
    """Keeps the main line's moving average (module docstring): reads it on train begin, updates it after each
    optimizer step, writes it into each checkpoint (main process) before :class:`CheckpointCallback` commits it.

    Args:
        model: the model the Trainer trains (its parameters are the ones stepped).
        decay: ``--ema_decay``, in (0, 1).
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.params = dict(model.named_parameters())  # tied parameters once, as the weights file holds them
        self.decay = decay
        self.average: dict[str, torch.Tensor] = {}
        self.steps: int | None = 0  # n of the module docstring; None: unrecorded, the uncorrected update

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        kept = read_ema(folder) if folder.is_dir() else None
        if kept is not None and kept.keys() == self.params.keys():
            self.average = {name: kept[name].to(p.device) for name, p in self.params.items()}
            self.steps = ema_steps(folder)
        else:
            if kept is not None:
                logger.warning("%s/%s holds other parameters than the model: restarted", folder.name, EMA_FILE)
            logger.info("weight average (ema): starts from the weights at step %d", state.global_step)
            self.average = {name: p.detach().float().clone() for name, p in self.params.items()}
            self.steps = 0
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        weight = 1.0 - self.decay
        if self.steps is not None:
            self.steps += 1
            weight /= 1.0 - self.decay**self.steps
        with torch.no_grad():
            for name, p in self.params.items():
                self.average[name].lerp_(p.detach().float(), weight)
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        from safetensors.torch import save_file

        if state.is_world_process_zero:
            folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
            tensors = {name: t.detach().cpu().contiguous() for name, t in self.average.items()}
            save_file(tensors, folder / EMA_FILE, metadata=None if self.steps is None else {STEPS_KEY: str(self.steps)})
        return control
