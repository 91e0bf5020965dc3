"""The exponential moving average of the weights, kept exactly across checkpoints (``--average_exports ema``).

After every optimizer step of the main line (step ``t``), for every parameter::

    ema_t = decay x ema_(t-1) + (1 - decay) x w_t          (fp32; ``decay``: ``--ema_decay``)

(Polyak averaging with an exponential window, as in Kaddour 2022, arXiv:2209.14981, section 2,
and Sanyal et al. 2023, arXiv:2306.03241; torch's ``swa_utils.get_ema_multi_avg_fn`` has the
same update). The average starts as the weights at the first step the option sees: a new line's
initial weights, or those of a checkpoint saved without one. Every checkpoint holds the average
of its step (``ema.safetensors``, written before the checkpoint's commit marker, so it is part of
what makes the checkpoint complete), and a run that resumes from a checkpoint resumes its
average: a resumed file ends with the same average as one trained straight through. The average
of the file's end checkpoint is what :func:`daemon.training.averaging.average_export` exports.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from daemon.store.checkpoints import EMA_FILE

logger = logging.getLogger(__name__)


def read_ema(folder: Path) -> dict[str, torch.Tensor] | None:
    """The average kept in a checkpoint folder (CPU tensors by parameter name), None if it holds none."""
    from safetensors.torch import load_file

    path = folder / EMA_FILE
    return load_file(path) if path.is_file() else None


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

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        kept = read_ema(folder) if folder.is_dir() else None
        if kept is not None and kept.keys() == self.params.keys():
            self.average = {name: kept[name].to(p.device) for name, p in self.params.items()}
        else:
            if kept is not None:
                logger.warning("%s/%s holds other parameters than the model: restarted", folder.name, EMA_FILE)
            logger.info("weight average (ema): starts from the weights at step %d", state.global_step)
            self.average = {name: p.detach().float().clone() for name, p in self.params.items()}
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            for name, p in self.params.items():
                self.average[name].lerp_(p.detach().float(), 1.0 - self.decay)
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        from safetensors.torch import save_file

        if state.is_world_process_zero:
            folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
            save_file({name: t.detach().cpu().contiguous() for name, t in self.average.items()}, folder / EMA_FILE)
        return control
