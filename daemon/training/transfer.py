"""The file's own slice scored before its first step: the "before" of forward transfer (:mod:`daemon.quality.transfer`).

:func:`score_before` runs in :meth:`daemon.training.run.FileRun.fit` once the main line's
``Trainer`` has put the model on its device and before it trains; :func:`add_before` writes the
score into the file's own row of the evaluation after the file. Its seconds count against
``--eval_budget`` (:func:`daemon.training.evaluation.evaluate_file`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.quality.forgetting import read_rows
from daemon.quality.transfer import forward_transfer
from daemon.store.files import atomic_write_text
from daemon.training.evaluation import FileEvaluation, Scorer, SliceScore, own_slice

if TYPE_CHECKING:
    from daemon.training.arguments import Flags
    from daemon.training.prepared import PreparedFile

logger = logging.getLogger(__name__)

# The current file's before score, kept so that a file resumed part-way still has it (one file trains at a time).
BEFORE_FILE = "before_training.json"


@dataclass
class BeforeScore:
    """The own slice scored by the model a file starts from.

    Attributes:
        score: the per-example sums (same examples, same order as the own slice after the file).
        step: the step of that model (the plan's ``start_step``).
        vocabulary: ``V``, the model's output tokens: ``ln V`` is the uniform predictor's loss.
        seconds: what scoring took.
    """

    score: SliceScore
    step: int
    vocabulary: int
    seconds: float


def score_before(prepared: PreparedFile, flags: Flags, ledger_id: int | None) -> BeforeScore | None:
    """Score the own slice with ``prepared.model`` as it is before the file's first step, and keep the score.

    The score is written to ``<status_dir>/before_training.json`` with the file's ledger row and
    start step, so that a file resumed part-way (``steps_done > 0``: the model in memory is no longer
    the one it started from) takes it from there. None (nothing scored) with ``--no_forward_transfer``,
    for a file without a held-out slice, and for a resumed file whose score was never kept (the
    log says so). A failure to score is logged and gives None: it never fails the file.
    """
    own = own_slice(prepared)
    if not flags.evaluation.forward_transfer or own is None:
        return None
    path = Path(flags.status.status_dir) / BEFORE_FILE
    if prepared.steps_done:
        kept = _read_kept(path, ledger_id, prepared.plan.start_step, own.name)
        if kept is None:
            logger.info("forward transfer: not measured for this file, resumed from step %d", prepared.plan.start_step)
        return kept
    started = time.monotonic()
    scorer = Scorer.for_file(prepared, flags)
    score = SliceScore(own.name, own.kind)
    try:
        scorer.score(own, 0, len(own.records), score)
    except Exception:  # a measurement, never the end of the file
        logger.exception("forward transfer: scoring the own slice before training failed")
        return None
    output = prepared.model.get_output_embeddings()
    vocabulary = int(output.weight.shape[0]) if output is not None else len(prepared.tokenizer)
    before = BeforeScore(score, prepared.plan.start_step, vocabulary, time.monotonic() - started)
    try:  # kept for a resume; a status folder that cannot take it costs the resume's score, not the file
        atomic_write_text(path, json.dumps({"ledger_id": ledger_id, **asdict(before)}) + "\n")
    except OSError as error:
        logger.warning("forward transfer: could not keep the score in %s (%s)", path, error)
    logger.info("forward transfer: own slice loss %.4f before training (%.1f s)", _loss(score), before.seconds)
    return before


def _read_kept(path: Path, ledger_id: int | None, start_step: int, slice_name: str) -> BeforeScore | None:
    """The score :func:`score_before` kept for this ledger row, start step and slice; None if it kept none."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        before = BeforeScore(SliceScore(**doc["score"]), doc["step"], doc["vocabulary"], 0.0)  # none spent now
    except (OSError, ValueError, KeyError, TypeError):
        return None
    mine = ledger_id is not None and doc.get("ledger_id") == ledger_id and before.step == start_step
    return before if mine and before.score.slice == slice_name else None


def _loss(score: SliceScore) -> float:
    loss = score.prefix_loss(score.examples)
    return math.nan if loss is None else loss


def add_before(row: dict[str, Any], before: BeforeScore) -> None:
    """Add ``before_step``, ``before_loss``, ``before_bits_per_byte`` and ``forward_transfer`` to the own row.

    Nothing is added (a warning says why) when the two scores are not of the same examples: a file resumed
    after its slice came to encode differently (another ``--max_seq_length``, tokenizer or chat template).
    """
    if before.score.examples != row["examples"] or before.score.bytes != row["bytes"]:
        logger.warning("forward transfer: the kept score is of other examples than the slice now; not reported")
        return
    loss = before.score.prefix_loss(before.score.examples)
    nats = sum(before.score.example_nats)
    row["before_step"] = before.step
    row["before_loss"] = loss
    row["before_bits_per_byte"] = nats / (math.log(2) * before.score.bytes) if before.score.bytes else None
    row["forward_transfer"] = None if loss is None else math.log(before.vocabulary) - loss


def with_before(scored: FileEvaluation, before: BeforeScore | None, status_dir: str | Path, start_step: int) -> None:
    """Add the before score to ``scored``'s own row, and set ``scored.forward_transfer`` (the file's and the stream's).

    Args:
        scored: the evaluation after the file (its rows are not recorded yet).
        before: :func:`score_before`'s score, or None (then only the earlier files' figures count).
        status_dir: where ``evaluations.jsonl`` holds the earlier models' rows.
        start_step: the file's start: rows above it are an undone attempt's and are left out.
    """
    if not scored.rows:
        return
    own = next((row for row in scored.rows if before is not None and row["slice"] == before.score.slice), None)
    if own is not None and before is not None:
        add_before(own, before)
    earlier = [row for row in read_rows(status_dir) if row["step"] <= start_step]
    scored.forward_transfer = forward_transfer(earlier + scored.rows, scored.rows[0]["step"])
