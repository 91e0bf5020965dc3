"""Averaged exports: an average of the main line's weights, exported and evaluated instead of the file's end model.

``--average_exports ema`` exports the exponential moving average over every step, kept in each
checkpoint (:mod:`daemon.training.ema`). With ``--average_exports lawa --average_last K`` the run,
after a file's last step ``end``, loads the weights of the checkpoints at the ends of the last
``K`` files (``end`` itself and the ``K - 1`` latest done files' ends still on disk:
:func:`averaged_steps`) and makes the model the file exports, samples and evaluates their
elementwise mean::

    w_export = (1 / n) x sum over s in S of w(checkpoint-s)      (fp32, every tensor of the weights file)

with ``S`` the ``n <= K`` steps (fewer at a line's start). This is LAWA, latest weight averaging
(Kaddour 2022, "Stop Wasting My Time! Saving Days of ImageNet and BERT Training with Latest
Weight Averaging", arXiv:2209.14981; Sanyal et al. 2023, "Early Weight Averaging meets High
Learning Rates for LLM Pre-training", arXiv:2306.03241), whose averaged checkpoints are spaced
along the trajectory; here they are the file boundaries, which the product keeps anyway
(``--keep_file_checkpoints``, :func:`daemon.store.rollback.kept_file_ends`). Hagele et al. 2024
(arXiv:2405.18392) found such averaging on a constant learning rate recovers much of a cooldown.

As with the cooldown branch (:mod:`daemon.training.cooldown`), the main line never sees either: no
optimizer step is added, the checkpoints and ``global_step`` are untouched, and the next file
continues from ``checkpoint-<end>``. ``export.json`` names the averaged steps
(``averaged_steps``) or the decay (``ema_decay``); the evaluation rows, samples and model card
are the averaged model's. A rollback (``python -m daemon rollback``, a failed file's undo)
exports the checkpoint's own weights, as it does after a cooldown: the next done file exports an
average again. A rerun of a file whose export was interrupted averages the same checkpoints
again: the same export.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.exceptions import TrainingError
from daemon.store.checkpoints import complete_checkpoint_steps
from daemon.store.rollback import kept_file_ends
from daemon.training.ema import EMA_FILE, read_ema

if TYPE_CHECKING:
    from daemon.store.ledger import Ledger
    from daemon.training.arguments import Flags
    from daemon.training.prepared import PreparedFile

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def averaged_steps(output_dir: str | Path, earlier_ends: set[int], end_step: int, k: int) -> list[int]:
    """The steps whose checkpoints are averaged: ``end_step`` and the latest ``k - 1`` earlier file ends on disk.

    Args:
        output_dir: the running model's folder.
        earlier_ends: the done files' end steps (the kept file boundaries).
        end_step: the file's own end (its checkpoint is complete by now).
        k: ``--average_last``.

    Returns:
        Up to ``k`` steps, oldest first, ``end_step`` last.
    """
    complete = set(complete_checkpoint_steps(output_dir))
    earlier = sorted(step for step in earlier_ends if step < end_step and step in complete)
    return [*earlier[max(0, len(earlier) - (k - 1)) :], end_step] if k > 1 else [end_step]


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint's weights: one file, or the shards its index names.

    Raises:
        TrainingError: the checkpoint holds no safetensors weights (``--save_safetensors false``).
    """
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if (folder / WEIGHTS_INDEX).is_file():
        shards = json.loads((folder / WEIGHTS_INDEX).read_text(encoding="utf-8"))["weight_map"].values()
        return [folder / name for name in sorted(set(shards))]
    raise TrainingError(f"{folder} holds no safetensors weights to average (--average_exports needs them)")


def average_checkpoints(folders: list[Path]) -> dict[str, Any]:
    """The elementwise mean of the checkpoints' weights, in fp32: ``name -> tensor`` (CPU).

    Sums one checkpoint at a time into an fp32 accumulator (one model's worth of memory besides
    the checkpoint being read), then divides by ``len(folders)``.

    Raises:
        TrainingError: the checkpoints do not hold the same tensors (names and shapes).
    """
    from safetensors.torch import load_file

    total: dict[str, Any] = {}
    for n, folder in enumerate(folders):
        weights: dict[str, Any] = {}
        for path in weight_files(folder):
            weights.update(load_file(path))
        if n and (weights.keys() != total.keys() or any(weights[k].shape != total[k].shape for k in total)):
            raise TrainingError(f"{folder.name} does not hold the tensors of {folders[0].name}: cannot average them")
        for name, tensor in weights.items():
            if n == 0:
                total[name] = tensor.float().clone()
            else:
                total[name] += tensor.float()
    return {name: tensor / len(folders) for name, tensor in total.items()}


def average_export(prepared: PreparedFile, flags: Flags, ledger: Ledger) -> dict[str, Any] | None:
    """Make ``prepared.model`` the averaged model; the main line's checkpoints stay as they are.

    ``lawa``: the mean of the last file ends' checkpoints (module docstring); ``ema``: the moving
    average kept in the file's end checkpoint (:mod:`daemon.training.ema`).

    Returns:
        What the export is the average of, for ``export.json`` and the status's ``evaluation``:
        ``{"averaged_steps": [...]}`` or ``{"ema_decay": d}``; None with ``--average_exports none``.

    Raises:
        TrainingError: a checkpoint cannot be averaged (no safetensors weights, other tensors, no average kept).
    """
    how = flags.averaging.average_exports
    if how == "none":
        return None
    output_dir, end = Path(str(flags.training.output_dir)), prepared.plan.max_steps
    if how == "ema":
        average = read_ema(output_dir / f"checkpoint-{end}")
        if average is None:
            raise TrainingError(f"checkpoint-{end} holds no {EMA_FILE}: its file was trained without the average")
        load_into(prepared.model, average, every_tensor=False)  # buffers (not trained) stay the end model's
        logger.info("averaged export: the moving average of the weights (--ema_decay %s)", flags.averaging.ema_decay)
        return {"ema_decay": flags.averaging.ema_decay}
    earlier = kept_file_ends(ledger, flags.training.keep_file_checkpoints)
    steps = averaged_steps(output_dir, earlier, end, flags.averaging.average_last)
    load_into(prepared.model, average_checkpoints([output_dir / f"checkpoint-{step}" for step in steps]))
    logger.info("averaged export: the mean of checkpoints %s (LAWA, --average_last %d)", steps, len(steps))
    return {"averaged_steps": steps}


def load_into(model: Any, average: dict[str, Any], every_tensor: bool = True) -> None:
    """Copy ``average`` into ``model``'s tensors in place (on their device, in their dtype).

    Raises:
        TrainingError: ``average`` names a tensor the model lacks or, with ``every_tensor``, leaves
            one of the model's tensors out (a tied tensor counts as its twin).
    """
    import torch

    state = model.state_dict()
    saved = {state[name].data_ptr() for name in average if name in state}
    unknown = sorted(set(average) - set(state))
    if every_tensor:
        unknown += [n for n in state if n not in average and state[n].data_ptr() not in saved]
    if unknown:
        raise TrainingError(f"the average does not match the model's tensors: {', '.join(unknown[:3])}")
    with torch.no_grad():
        for name, tensor in average.items():  # a tied tensor is saved once and shares its storage in the model
            state[name].copy_(tensor.to(state[name].dtype))
