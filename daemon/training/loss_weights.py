"""``--replay_loss_weight``: the replayed examples' tokens weigh more in the loss (docs/data.md).

A file's training examples are its own and ``--replay_fraction`` replayed ones (with a pretrained
base, the base model's rehearsed answers too). With a weight ``w`` each replayed example's tokens
count ``w`` times in the step's loss and in its normaliser, so the loss stays a weighted *mean*
over the step's learned tokens:

    loss = sum_t w_t * nll_t / sum_t w_t     (nats per weighted token)

where ``w_t`` is the weight of the row token ``t`` belongs to (1 for the file's own rows). The
gradient is then that of a mix in which the replayed rows' share of the tokens is ``w`` times
larger, without training more rows: the steps, tokens and time of the file are those of
``--replay_fraction``. No paper fixes ``w``: the stream benchmark measures it (BENCHMARKS.md,
"continual").

Where it acts: the column ``loss_weight`` (float, one per row) is written by
:func:`daemon.training.data.mix_replay` only when ``w != 1``, carried by
:class:`~daemon.training.data.PaddingCollator` as ``[rows]``, and read by
:class:`~daemon.training.speed.accumulation.ThreadedAccumulationTrainer`'s ``compute_loss`` and its
count of the step's items (:func:`weighted_items`), so the sum over micro-batches and over gradient
worker shards adds up to the step's weighted mean, as the unweighted loss does.
The column ``distillation`` (``--replay_distillation`` and ``--file_distillation``,
:mod:`daemon.training.distillation`) travels the same way and adds its term to the same sum. The cooldown
branch (``--cooldown_fraction``) samples the file's training rows with their weights under ``--cooldown_mix
file``; ``balanced`` draws every share by count and weighs its rows alike.
"""

from __future__ import annotations

from typing import Any

import torch

LOSS_WEIGHT = "loss_weight"  # the column and the collated key
DISTILLATION = "distillation"  # the row's weight of its KL term: --replay_distillation's, or --file_distillation's
ROW_COLUMNS = (LOSS_WEIGHT, DISTILLATION)  # float columns, one value per row, read by the loss and not the model


def weighted_items(batch: dict[str, Any]) -> torch.Tensor:
    """The weighted count of a micro-batch's learned tokens: ``sum_rows w_row * learned_row``.

    A learned token is a label other than -100 at positions 1.. (the causal shift: position 0 is
    predicted by nothing). Without a ``loss_weight`` key every row weighs 1.

    Args:
        batch: ``labels`` ``[rows, length]`` (int64) and optionally ``loss_weight`` ``[rows]``.

    Returns:
        A float32 scalar tensor on the labels' device.
    """
    learned = batch["labels"][..., 1:].ne(-100).sum(dim=-1).float()
    weights = batch.get(LOSS_WEIGHT)
    return learned.sum() if weights is None else (learned * weights.to(learned.device, torch.float32)).sum()


def weighted_causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, num_items_in_batch: torch.Tensor | float | None
) -> torch.Tensor:
    """The causal LM loss with a weight per row: ``sum_t w_t * nll_t / num_items_in_batch``, in nats.

    The same shift and fp32 upcast as transformers' ``ForCausalLMLoss``; with every weight 1 it is
    that loss.

    Args:
        logits: ``[rows, length, vocab]``.
        labels: ``[rows, length]`` (int64, -100 where nothing is learned).
        weights: ``[rows]``, each >= 0.
        num_items_in_batch: the optimizer step's :func:`weighted_items` summed over its micro-batches
            (the loss is then a part of the step's weighted mean); None: this micro-batch's own.

    Returns:
        A scalar tensor.
    """
    logits = logits.float()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1).to(logits.device), reduction="none"
    ).view(shifted.shape)
    row_weights = weights.to(nll.device, torch.float32).unsqueeze(-1)
    total = (nll * row_weights).sum()
    if num_items_in_batch is None:
        num_items_in_batch = (shifted.ne(-100).float() * row_weights).sum()
    return total / num_items_in_batch
