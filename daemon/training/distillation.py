"""``--replay_distillation`` and ``--file_distillation``: a file's rows keep the next-token distributions of the
model it started from.

Replay (:mod:`daemon.store.replay`) trains the replayed examples' tokens as labels, which says what the
earlier files' text *was*, one token at a time. With a weight ``a > 0`` the loss also pulls the model's
whole next-token distribution at each of their learned tokens toward the distribution the model had
when the file started (the *teacher*: the weights at the plan's first step, frozen):

    loss = (sum_t w_t * nll_t + sum_{t in replayed} a * KL_t + sum_{t in own} b * KL_t) / sum_t w_t,
    KL_t = KL(p_teacher,t || p_model,t)

in nats per weighted token, the denominator the step's weighted count of learned tokens
(:mod:`daemon.training.loss_weights`). It is Learning without Forgetting's distillation term (Li and
Hoiem 2016, arXiv:1606.09282, section 3) taken on replayed examples, as dark experience replay
distils on its buffer (Buzzega et al. 2020, arXiv:2004.07211, section 3; they store the logits seen
when an example was added, we take those of the file's starting model, so nothing more is stored).
The teacher costs one forward pass over the replayed rows of each micro-batch (about a tenth of the
rows at the default replay) and a copy of the weights in memory (its linear layers in the training's
autocast dtype, :func:`linears_in`).

``b`` (``--file_distillation``) takes the same term on the file's *own* learned tokens, which is
Learning without Forgetting as its authors wrote it: the new data's predictions are held near the old
model's while the labels teach the new text, so the optimum at each token is the mix ``(one-hot + b x
p_teacher) / (1 + b)`` rather than the one-hot alone. It needs a trained starting model (a checkpoint or
a pretrained base; never a line's first file from scratch, :func:`trained_start`), and the teacher's
forward pass then covers every row. The stream benchmark measures ``a`` and ``b`` (BENCHMARKS.md,
"continual").

**Resumed files.** The teacher is always the model at the plan's first step: a file resumed after a
crash loads it from that step's checkpoint (the rotation never deletes it,
:class:`~daemon.training.callbacks.CheckpointCallback`), or from the pretrained base for a line's
first file, so a resumed file trains as the uninterrupted one did. The cooldown branch does not distil.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from daemon.store.checkpoints import complete_checkpoint_steps
from daemon.training.evaluation import autocast_dtype
from daemon.training.loss_weights import DISTILLATION

if TYPE_CHECKING:
    from daemon.training.arguments import Flags
    from daemon.training.prepared import PreparedFile

logger = logging.getLogger(__name__)


def distillation_loss(
    logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``sum_t a_t * KL(p_teacher,t || p_model,t)`` over the learned tokens of some rows, in nats (a sum, not a mean).

    Args:
        logits: the model's ``[rows, length, vocab]``.
        teacher_logits: the teacher's for the same rows, ``[rows, length, vocab]`` (no gradient).
        labels: ``[rows, length]`` (int64): the KL is taken where the shifted label is not -100, the tokens
            the NLL learns (the same causal shift).
        weights: ``[rows]``: ``a`` of each row (``--replay_distillation``; 0 on the file's own rows).

    Returns:
        A float32 scalar tensor; divided by the step's weighted token count it joins the weighted mean NLL.
    """
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].to(logits.device)
    log_model = torch.log_softmax(logits.float(), dim=-1)
    log_teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_model)).sum(dim=-1)  # [rows, length]
    learned = shifted.ne(-100).float() * weights.to(kl.device, torch.float32).unsqueeze(-1)
    return (kl * learned).sum()


def teacher_logits(teacher: Any, forward: dict[str, Any], rows: torch.Tensor, precision: Any) -> torch.Tensor:
    """The teacher's logits on the selected rows of a micro-batch, without gradient, at the training's precision.

    Args:
        teacher: the frozen model (:func:`teacher_for`).
        forward: the micro-batch's model inputs (``input_ids`` ``[rows, length]``, ``attention_mask``, ...).
        rows: ``[rows]`` bool, the rows to distil.
        precision: the training's autocast dtype (:func:`daemon.training.evaluation.autocast_dtype`), None for fp32.

    Returns:
        ``[selected rows, length, vocab]``.
    """
    selected = {k: v[rows] if torch.is_tensor(v) and v.shape[:1] == rows.shape else v for k, v in forward.items()}
    device = rows.device.type
    with torch.no_grad(), torch.autocast(device, dtype=precision, enabled=precision is not None):
        return teacher(**selected, use_cache=False).logits


def teacher_for(prepared: PreparedFile, flags: Flags, model: Any) -> Any | None:
    """The frozen model the file's replayed rows are distilled toward, or None without distillation.

    Args:
        prepared: the file's run (its plan, whether it resumed, its replayed rows).
        flags: ``--replay_distillation``, the output folder, the starting model's flags.
        model: the model at the step the run starts from; the copy goes to the training's device.

    Returns:
        A copy of ``model`` in eval mode with no parameter trained, holding the weights of the plan's first
        step, its linear layers in the training's autocast dtype (:func:`linears_in`); None when no row of the
        file is distilled (no ``distillation`` column: :func:`daemon.training.data.mix_replay`).
    """
    if DISTILLATION not in prepared.datasets.train.column_names:
        return None
    teacher = copy.deepcopy(model).eval().to(flags.training.device)  # where the Trainer trains the model
    teacher.requires_grad_(False)
    if prepared.steps_done > 0:  # resumed: the weights the file started from, not the latest checkpoint's
        start = start_weights(prepared, flags)
        if start is None:
            step = prepared.plan.start_step
            logger.warning(
                "%s is gone: this file's replayed examples are distilled toward the model of step %d",
                f"the checkpoint of step {step} (this file's start)" if step else "the base model",
                step + prepared.steps_done,
            )
        else:
            teacher.load_state_dict(start)
    precision = autocast_dtype(flags.training.bf16, flags.training.fp16)
    if precision is not None:
        linears_in(teacher, precision)
    techniques, distilled = flags.techniques, []
    if prepared.datasets.replayed and techniques.replay_distillation > 0:
        distilled.append(f"the replayed examples (--replay_distillation {techniques.replay_distillation:g})")
    if techniques.file_distillation > 0 and trained_start(flags, prepared.plan.start_step):
        distilled.append(f"the file's own (--file_distillation {techniques.file_distillation:g})")
    logger.info("distilling %s toward the model of step %d", " and ".join(distilled), prepared.plan.start_step)
    return teacher


def linears_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Hold every ``nn.Linear``'s weight and bias of a frozen ``model`` in ``dtype``, the training's autocast dtype.

    Autocast casts a linear layer's fp32 weight to ``dtype`` at every call and caches the cast only for tensors that
    require grad, so a frozen teacher paid the cast on every micro-batch; held in ``dtype`` the layer computes the
    same bits (the same round-to-nearest cast, done once). An output layer tied to the embedding gets its own copy:
    the embedding, the norms and everything autocast keeps in fp32 stay fp32. Not for a model that trains.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
            if module.bias is not None:
                module.bias = torch.nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)


def trained_start(flags: Flags, start_step: int) -> bool:
    """Whether a file that starts at ``start_step`` starts from a trained model (a checkpoint, or a pretrained
    base), not from the embedded model's random initialisation: only such a model is a teacher for
    ``--file_distillation``."""
    return start_step > 0 or flags.base_model() is not None


def start_weights(prepared: PreparedFile, flags: Flags) -> dict[str, torch.Tensor] | None:
    """The model's weights at the plan's first step: its checkpoint's, or the starting model's at step 0.

    Returns:
        ``name -> tensor`` (CPU), or None where that checkpoint is no longer complete on disk.
    """
    from daemon.training.model import load_pretrained, pretrained_start

    output_dir, step = str(flags.training.output_dir), prepared.plan.start_step
    if step > 0:
        if step not in complete_checkpoint_steps(output_dir):
            return None
        folder: str | None = str(Path(output_dir) / f"checkpoint-{step}")
    else:
        folder = pretrained_start(flags.model, output_dir)
    if folder is None:  # the embedded model's first file: its bootstrap is seeded, but replays nothing to distil
        return None
    start, _ = load_pretrained(folder, flags.model.trust_remote_code)
    return start.state_dict()
