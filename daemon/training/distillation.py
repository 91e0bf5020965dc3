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
autocast dtype, :func:`linears_in`); the NLL and the KL are one autograd node
(:func:`distilled_causal_lm_loss`).

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


def distilled_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    rows: torch.Tensor,
    distillation: torch.Tensor,
    teacher_logits: torch.Tensor,
    num_items_in_batch: torch.Tensor | float,
) -> torch.Tensor:
    """The weighted causal LM loss plus the distilled rows' KL term, over the step's weighted token count (nats).

    ``(sum_t w_t * nll_t + sum_{t in rows} a_t * KL(p_teacher,t || p_model,t)) / num_items_in_batch``: the
    module docstring's loss, with ``nll`` and the shift of
    :func:`~daemon.training.loss_weights.weighted_causal_lm_loss` (which it equals where ``rows`` is empty) and
    the KL taken, as the NLL, at the learned tokens (shifted label not -100). One autograd node
    (:class:`_NllAndKl`) computes both from one ``logsumexp`` of the model's logits and, backward, writes the
    gradient ``(w_t + a_t) * p_model,t - w_t * onehot(y_t) - a_t * p_teacher,t`` in one pass (the gradient of a
    softmax cross-entropy toward a target distribution; Hinton et al. 2015, "Distilling the knowledge in a neural
    network", arXiv:1503.02531, section 2.1, at temperature 1). Taken apart, the two terms made autograd write and
    read the vocabulary-wide tensors several times more, and the KL's own log-softmax repeated the NLL's
    (BENCHMARKS.md, "Measurements behind the code").

    Args:
        logits: the model's ``[rows, length, vocab]`` (any float dtype; computed in fp32).
        labels: ``[rows, length]`` int64, -100 where nothing is learned.
        weights: ``[rows]``, each row's ``loss_weight`` (1 without ``--replay_loss_weight``).
        rows: ``[rows]`` bool, the distilled rows (at least one).
        distillation: ``[distilled rows]``, each distilled row's ``a`` (``--replay_distillation`` or
            ``--file_distillation``).
        teacher_logits: the teacher's ``[distilled rows, length, vocab]`` (:func:`teacher_logits`; no gradient).
        num_items_in_batch: the step's weighted count of learned tokens
            (:func:`~daemon.training.loss_weights.weighted_items`).

    Returns:
        A float32 scalar tensor.
    """
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].to(logits.device)
    learned = shifted.ne(-100).float()
    index = rows.to(logits.device).nonzero().squeeze(-1)
    weighted = learned * weights.to(logits.device, torch.float32).unsqueeze(-1)
    distilled = learned.index_select(0, index) * distillation.to(logits.device, torch.float32).unsqueeze(-1)
    total = _NllAndKl.apply(logits, shifted, weighted, index, distilled, teacher_logits)
    return total / num_items_in_batch


class _NllAndKl(torch.autograd.Function):
    """``sum w nll + sum a KL`` (:func:`distilled_causal_lm_loss`) with a hand-written gradient.

    Forward: ``lse = logsumexp(z)``, ``nll = lse - z_y``, and on the distilled rows ``KL = sum_v p_t (t - z) -
    lse_t + lse`` (``t`` the teacher's logits, ``lse_t`` their logsumexp, ``p_t = exp(t - lse_t)``, since ``sum_v
    p_t = 1``). Saved for backward: the logits as given, ``lse``, the labels and weights, and ``p_t``;
    ``p_model = exp(z - lse)`` is recomputed there rather than kept in fp32.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,
        shifted: torch.Tensor,
        weighted: torch.Tensor,
        index: torch.Tensor,
        distilled: torch.Tensor,
        teacher_logits: torch.Tensor,
    ) -> torch.Tensor:
        z = logits.float()
        lse = torch.logsumexp(z, dim=-1)  # [rows, length]
        labels = shifted.clamp(min=0)  # -100 -> 0, where the weight is 0
        nll = lse - z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        lowest = torch.finfo(torch.float32).min  # -inf made finite: a zero probability then adds 0, not 0 x inf
        t = teacher_logits.float().clamp(min=lowest)  # a copy: the caller's logits stay as they are
        lse_t = torch.logsumexp(t, dim=-1)
        p_teacher = torch.sub(t, lse_t.unsqueeze(-1)).exp_()
        t.sub_(z.index_select(0, index).clamp_(min=lowest))  # t - z on the distilled rows
        kl = torch.linalg.vecdot(p_teacher, t) - lse_t + lse.index_select(0, index)
        ctx.save_for_backward(logits, lse, labels, weighted, index, distilled, p_teacher)
        # where nothing is learned the terms are left out, not multiplied by 0: a position's logits there may be
        # inf or nan (padding), which the stock loss ignores too
        zero = torch.zeros((), device=z.device)
        learned = torch.where(weighted > 0, nll * weighted, zero).sum()
        return learned + torch.where(distilled > 0, kl * distilled, zero).sum()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        logits, lse, labels, weighted, index, distilled, p_teacher = ctx.saved_tensors
        weight = weighted.index_add(0, index, distilled)  # w + a at each position
        grad = torch.sub(logits.float(), lse.unsqueeze(-1)).exp_()  # p_model
        grad.mul_(weight.unsqueeze(-1))
        grad.scatter_add_(-1, labels.unsqueeze(-1), -weighted.unsqueeze(-1))
        grad.index_add_(0, index, p_teacher * distilled.unsqueeze(-1), alpha=-1)
        grad[weight == 0] = 0  # nothing learned there: no gradient, whatever the logits (the forward's where)
        grad.mul_(grad_output)
        return grad.to(logits.dtype), None, None, None, None, None


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
        model: the model at the step the run starts from, before the Trainer moves it; the copy goes to the
            training's device once its linear layers are cast.

    Returns:
        A copy of ``model`` in eval mode with no parameter trained, holding the weights of the plan's first
        step, its linear layers in the training's autocast dtype (:func:`linears_in`); None when no row of the
        file is distilled (no ``distillation`` column: :func:`daemon.training.data.mix_replay`).
    """
    if DISTILLATION not in prepared.datasets.train.column_names:
        return None
    teacher = copy.deepcopy(model).eval()
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
    teacher.to(flags.training.device)  # where the Trainer will train the model, once cast: no fp32 copy there
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
    from daemon.training.model import load_pretrained

    output_dir, step = str(flags.training.output_dir), prepared.plan.start_step
    if step > 0:
        if step not in complete_checkpoint_steps(output_dir):
            return None
        folder: str | None = str(Path(output_dir) / f"checkpoint-{step}")
    else:  # the line's base (origin.json), whatever --model_name_or_path this run was given
        folder = flags.base_model()
    if folder is None:  # the embedded model's first file: its bootstrap is seeded, but replays nothing to distil
        return None
    start, _ = load_pretrained(folder, flags.model.trust_remote_code)
    return start.state_dict()
