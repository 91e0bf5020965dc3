"""WiSE-FT exports (``--wise_ft``): the trained weights interpolated with the pretrained base's (docs/data.md).

For a line started from ``--model_name_or_path``, after a file (and after the main line's end
checkpoint is saved), the model the file exports, samples and evaluates becomes::

    w_export(a) = (1 - a) x w_base + a x w_trained        (fp32, every tensor of the model)

with ``a`` the value of :data:`ALPHAS` whose model has the lowest mean loss over the slices of the
evaluation suite (the file's own held-out slice and every other slice, the base model's
``00000000-base-model`` included, each over its first :data:`EXAMPLES` examples in subset
order; each model costs one such pass). ``a = 1``
is the trained model itself, so the choice never scores worse on that suite than no
interpolation. This is WiSE-FT, weight-space ensembling of the fine-tuned and zero-shot models
(Wortsman et al. 2022, "Robust fine-tuning of zero-shot models", arXiv:2109.01903), which keeps
much of the base model's general ability at little cost to the new data; the mixing weight is
chosen on held-out data as there.

As with averaged exports (:mod:`daemon.training.averaging`) the main line never sees it: the
checkpoints and ``global_step`` are untouched and the next file trains from ``checkpoint-<end>``.
The base weights are read from the base's folder (``origin.json``'s ``base_model``) after every
file, in fp32, and never trained. ``export.json`` and the status's ``evaluation`` record
``wise_ft: {"alpha", "losses"}`` (mean loss in nats for each ``a``), and the evaluation rows
score the exported model. A rollback exports the checkpoint's own weights, as after an average.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from daemon.exceptions import TrainingError
from daemon.store.suite import load_suite
from daemon.training.averaging import load_into
from daemon.training.evaluation import Scorer, SliceScore, own_slice

if TYPE_CHECKING:
    from daemon.training.arguments import Flags
    from daemon.training.prepared import PreparedFile

logger = logging.getLogger(__name__)

ALPHAS = (0.25, 0.5, 0.75, 1.0)  # the weight of the trained model; 1.0 is the trained model itself
EXAMPLES = 32  # examples of each slice the choice of a scores (a slice holds up to --max_eval_examples)


def base_weights(base: str) -> dict[str, Any]:
    """The pretrained base's weights in fp32 on the CPU: ``name -> tensor`` (a fresh copy, never the training's).

    Raises:
        TrainingError: the base cannot be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise TrainingError(f"--wise_ft cannot read the base model {base}: {e}") from e
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def interpolate(base: dict[str, Any], trained: dict[str, Any], alpha: float) -> dict[str, Any]:
    """``(1 - alpha) x base + alpha x trained`` for every tensor of ``trained`` (fp32).

    Raises:
        TrainingError: the base lacks a tensor of the trained model or has it in another shape.
    """
    wrong = [n for n in trained if n not in base or base[n].shape != trained[n].shape]
    if wrong:
        raise TrainingError(f"--wise_ft: the base model does not hold the trained model's {', '.join(wrong[:3])}")
    return {name: (1.0 - alpha) * base[name].float() + alpha * tensor.float() for name, tensor in trained.items()}


def suite_loss(prepared: PreparedFile, flags: Flags) -> float:
    """The model's mean loss (nats) over the slices of the suite, each over its first :data:`EXAMPLES` examples.

    A slice that cannot be scored is left out (logged); NaN when none was scored.
    """
    plan, data = prepared.plan, flags.data
    others, _ = load_suite(
        flags.status.status_dir, plan.start_step, flags.evaluation.eval_files, data.text_field, data.max_eval_examples
    )
    own = own_slice(prepared)
    scorer = Scorer.for_file(prepared, flags)
    losses = []
    for piece in ([own] if own is not None else []) + others:
        score = SliceScore(piece.name, piece.kind)
        try:
            scorer.score(piece, 0, EXAMPLES, score)
        except Exception:  # one bad slice is left out of the choice, as the evaluation reports it
            logger.exception("--wise_ft: scoring slice %s failed; left out of the choice", piece.name)
            continue
        loss = score.prefix_loss(score.examples)
        if loss is not None:
            losses.append(loss)
    return sum(losses) / len(losses) if losses else float("nan")


def wise_export(prepared: PreparedFile, flags: Flags) -> dict[str, Any] | None:
    """Make ``prepared.model`` the interpolation with the base of the lowest suite loss (module docstring).

    Returns:
        ``{"wise_ft": {"alpha": a, "losses": {"0.25": nats, ...}}}`` for ``export.json`` and the
        status's ``evaluation``; None without ``--wise_ft``.

    Raises:
        TrainingError: the line has no base, or its weights cannot be read or do not match the model's.
    """
    if not flags.techniques.wise_ft:
        return None
    base_name = flags.base_model()
    if base_name is None:
        raise TrainingError("--wise_ft: the running model's line has no pretrained base")
    model = prepared.model
    trained = {name: tensor.detach().float().cpu().clone() for name, tensor in model.state_dict().items()}
    base = base_weights(base_name)
    losses: dict[str, float] = {}
    for alpha in ALPHAS:
        load_into(model, interpolate(base, trained, alpha), every_tensor=False)
        losses[str(alpha)] = suite_loss(prepared, flags)
    best = min(ALPHAS, key=lambda a: (_ordered(losses[str(a)]), -a))  # a tie keeps more of the trained model
    load_into(model, interpolate(base, trained, best), every_tensor=False)
    logger.info(
        "WiSE-FT export: %.2f x trained + %.2f x base (mean suite loss %s)",
        best,
        1.0 - best,
        ", ".join(f"{a}: {loss:.4f}" for a, loss in losses.items()),
    )
    return {"wise_ft": {"alpha": best, "losses": losses}}


def _ordered(loss: float) -> float:
    """A loss as a sort key: NaN ranks last."""
    return float("inf") if loss != loss else loss
