"""Forward transfer: what the model already knew of each file before training on it (docs/evaluation.md).

With ``--forward_transfer`` (on by default), the model a file starts from (the main line's
checkpoint at the file's ``start_step``) scores the file's own held-out slice before the file's
first step (:mod:`daemon.training.transfer`), on the same examples as the evaluation after the
file. The file's own row of ``evaluations.jsonl`` (:mod:`daemon.quality.forgetting`) then also holds:

    before_step          = the file's start step (the model that scored "before")
    before_loss          = L(i-1, i): slice i's loss by the model before file i       (nats per token)
    before_bits_per_byte = the same in bits per byte
    forward_transfer     = ln(V) - before_loss                                         (nats per token)

so the forgetting matrix's diagonal reads ``before -> after`` and ``before - after`` is what
training on the file taught (:func:`learned`).

**Forward transfer** is that of Lopez-Paz & Ranzato 2017 ("Gradient Episodic Memory for
Continual Learning", arXiv:1706.08840, section 2): ``FWT = 1/(T-1) sum_{i=2..T} R(i-1, i) - b_i``,
with ``R(i-1, i)`` the test score on task ``i`` of the model trained up to task ``i - 1`` and
``b_i`` that of the model at random initialisation; Avalanche's ``ForwardTransfer``
(``avalanche/evaluation/metrics/forward_transfer.py``) is the same per experience: the value
"after the previous experience" minus the value "at random initialization". For a loss (lower is
better) the difference is turned round, so positive still means the earlier files helped. The
reference ``b_i`` is the loss of the uniform predictor over the model's ``V`` output tokens,
``ln V`` nats per token, which a freshly initialised model approaches (its logits are near zero);
the initial model itself is not kept, so its exact loss on a later file is never known. For a
line started from a pretrained base, forward transfer therefore includes what the base knew.
The stream's figure (:func:`forward_transfer`) is the mean over every file but the line's first
(``before_step`` 0), as GEM's sum starts at ``i = 2``.

Standard library only: ``python -m daemon status`` reads it without torch.
"""

from __future__ import annotations

from typing import Any

from daemon.store.suite import HELD_OUT


def learned(row: dict[str, Any]) -> float | None:
    """``before_loss - loss`` of an own-slice row (nats): what training on the file taught; None without a before."""
    before, after = row.get("before_loss"), row.get("loss")
    return None if before is None or after is None else before - after


def own_rows(rows: list[dict[str, Any]], step: int | None = None) -> list[dict[str, Any]]:
    """The rows with a before-training score (each file's own slice, scored at the file's end), up to ``step``."""
    return [
        row
        for row in rows
        if row["kind"] == HELD_OUT and row.get("before_loss") is not None and (step is None or row["step"] <= step)
    ]


def forward_transfer(rows: list[dict[str, Any]], step: int) -> dict[str, Any] | None:
    """The forward transfer of the file that ended at ``step`` and of the stream up to it (module docstring).

    Args:
        rows: evaluation rows up to ``step``, oldest first.
        step: the model's ``global_step`` (the end of the file just evaluated).

    Returns:
        ``{"slice", "before_loss", "after_loss", "learned", "forward_transfer", "mean", "files"}``: the
        file's own figures (nats; None where it has no before score) and the mean forward transfer over
        ``files`` files after the line's first; None when no file up to ``step`` has a before score.
    """
    scored = own_rows(rows, step)
    if not scored:
        return None
    later = [
        row["forward_transfer"] for row in scored if row.get("before_step") and row.get("forward_transfer") is not None
    ]
    own = next((row for row in scored if row["step"] == step), None)
    return {
        "slice": own["slice"] if own else None,
        "before_loss": own["before_loss"] if own else None,
        "after_loss": own["loss"] if own else None,
        "learned": learned(own) if own else None,
        "forward_transfer": own.get("forward_transfer") if own else None,
        "mean": sum(later) / len(later) if later else None,
        "files": len(later),
    }


def row_numbers(steps: list[int]) -> list[int]:
    """The number each of the matrix's rows (``steps``, ascending) is shown with, in every table and plot.

    Done files are 1, 2, ... as in the history's tables; a pretrained base's row at step 0 (its own
    answers scored before any file, :mod:`daemon.training.base_slice`) is 0, so the files keep their numbers.
    """
    offset = 0 if steps and steps[0] == 0 else 1
    return [i + offset for i in range(len(steps))]


def format_transfer(rows: list[dict[str, Any]], max_files: int = 10) -> list[str]:
    """Each file's own slice before and after training on it, for ``python -m daemon status``; empty without any.

    Lines of at most 60 characters: file number (as the matrix numbers them), step, before, after,
    learned (before - after) and forward transfer, all in nats.
    """
    scored = own_rows(rows)
    if not scored:
        return []
    steps = sorted({row["step"] for row in rows})
    numbers = dict(zip(steps, row_numbers(steps), strict=True))
    lines = ["own slice before -> after training on it (nats; fwt = ln V - before)"]
    lines.append("  file   step  before   after  learned     fwt")
    for row in scored[-max_files:]:
        number = numbers[row["step"]]
        gain, fwt = learned(row), row.get("forward_transfer")
        lines.append(
            f"  {number:>4} {row['step']:>6} {row['before_loss']:>7.3f} {row['loss']:>7.3f} "
            f"{_signed(gain):>8} {_signed(fwt):>7}"
        )
    return lines


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"
