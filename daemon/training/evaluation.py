"""Scoring the model after each file on every slice of the suite, in a budget (docs/evaluation.md).

:func:`evaluate_file` runs once training and its threads have stopped: it scores the
file's own held-out slice (whole: its ``eval_loss``), then every earlier held-out slice and
every ``--eval_files`` file on their fixed subsets (:mod:`daemon.store.suite`), and hands the rows,
forgetting and quality gate of :mod:`daemon.quality.forgetting` to the run.

**Metrics** of a slice, over its learned tokens (every token of a text and its closing EOS,
a completion and its EOS, the assistant turns of a conversation), each predicted once, with
the context its window holds (windows of ``--max_seq_length`` tokens overlapping by one):

    loss          = nats / tokens                  (mean token cross-entropy, nats)
    perplexity    = exp(loss)
    bits_per_byte = nats / (ln 2 x bytes)

``nats`` is the summed cross-entropy of the learned tokens and ``bytes`` the UTF-8 bytes of
the text they cover (a text, a completion, the rendered assistant turns; an EOS covers none).
Bits per byte does not depend on the tokenizer: it is the ``bits_per_byte`` aggregation of
EleutherAI's lm-evaluation-harness (``lm_eval/api/metrics.py``: ``-sum(loglikelihood) /
sum(bytes) / ln 2``), as reported for the Pile (Gao et al. 2020, arXiv:2101.00027).

**The budget** (:func:`evaluate_suite`): after the own slice, the first :data:`MIN_EXAMPLES`
of every other slice are scored; the seconds per token measured so far give the ``k`` of the
subset (:data:`MIN_EXAMPLES` times a power of two: 1, 2, 4, ..., so it rarely moves) that keeps the whole
evaluation within ``--eval_budget`` x the file's training seconds, and examples up to ``k``
follow. Every slice is scored after every file; a large suite costs at least
:data:`MIN_EXAMPLES` examples a slice. The base-model slice of a pretrained start
(:mod:`daemon.training.base_slice`) is scored whole, like the own slice: it is the one measure of
general ability, 24 short answers; after SmolLM2's chat drop one example of it read +0.16 nats of
drift where the bench's score of the whole slice read +0.55 (BENCHMARKS.md, "real-model stream").
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.exceptions import RegressionError
from daemon.names import counted, printable
from daemon.quality.forgetting import (
    forgetting,
    gate_message,
    quality_gate,
    read_rows,
    rows_at,
    write_rows,
)
from daemon.store.status import SNAPSHOT_FIGURES, mark_progress
from daemon.store.suite import BASE_FILE, HELD_OUT, Slice, load_suite, slice_name, subset, write_slice
from daemon.training.encoding import IGNORE_INDEX, encode_example, windows

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from daemon.training.arguments import Flags
    from daemon.training.prepared import PreparedFile

logger = logging.getLogger(__name__)

# Examples of every slice scored after every file, whatever the budget. One, so that a suite of many
# slices stays within ``--eval_budget`` (with 4, 50 slices cost 17 % of a one-minute file's wall time:
# BENCHMARKS.md); the budget doubles it for every slice alike while it fits.
MIN_EXAMPLES = 1

# Windows a scorer holds and sorts by length at a time: a few MB of token lists, however long the
# records of a slice (an eval file may hold documents of thousands of windows).
SORTED_WINDOWS = 256


@dataclass
class SliceScore:
    """Per-example sums over the scored examples of one slice, in subset order.

    The metrics of the module docstring derive from them; ``prefix_loss`` gives the loss
    over the first ``n`` examples, so that two evaluations of a slice with different
    ``k`` still compare on the same examples (:func:`daemon.quality.forgetting.matched_losses`).
    """

    slice: str
    kind: str
    example_nats: list[float] = field(default_factory=list)
    example_tokens: list[int] = field(default_factory=list)
    bytes: int = 0

    @property
    def examples(self) -> int:
        return len(self.example_nats)

    @property
    def tokens(self) -> int:
        return sum(self.example_tokens)

    def prefix_loss(self, n: int) -> float | None:
        """Mean token loss (nats) over the first ``n`` examples, None when they have no learned token."""
        tokens = sum(self.example_tokens[:n])
        return sum(self.example_nats[:n]) / tokens if tokens else None

    def as_row(self, step: int, after_file: str, sha256: str) -> dict[str, Any]:
        """One ``evaluations.jsonl`` row: this slice scored by the model at ``step``, after ``after_file``.

        ``prefix_loss`` maps ``n`` to the loss over the first ``n`` examples, for ``n`` in
        :data:`MIN_EXAMPLES`, twice that, ... below ``examples``, and ``examples`` itself:
        every ``k`` the budget can pick.
        """
        loss = self.prefix_loss(self.examples)
        sizes = [MIN_EXAMPLES * 2**i for i in range(32) if MIN_EXAMPLES * 2**i < self.examples] + [self.examples]
        nats = sum(self.example_nats)
        return {
            "step": step,
            "after_file": after_file,
            "sha256": sha256,
            "slice": self.slice,
            "kind": self.kind,
            "examples": self.examples,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "loss": loss,
            "perplexity": None if loss is None else math.exp(min(loss, 700.0)),
            "bits_per_byte": nats / (math.log(2) * self.bytes) if self.bytes else None,
            "prefix_loss": {str(n): self.prefix_loss(n) for n in sizes},
        }


@dataclass
class SuiteResult:
    """What :func:`evaluate_suite` measured: a score per slice it could score, the errors, the cost."""

    scores: list[SliceScore] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    budget_seconds: float = 0.0
    examples_per_slice: int = 0  # the k of the subset of the slices other than the file's own


class Scorer:
    """Sums the cross-entropy of learned tokens over examples of slices, for one model.

    Args:
        model, tokenizer: the model after the file; training threads must have stopped.
        max_length: tokens per window (``--max_seq_length``, at least 2).
        batch_size: windows per forward pass (``--per_device_eval_batch_size``).
        autocast: ``torch.bfloat16`` / ``torch.float16`` to score in the training precision, or None (fp32).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        batch_size: int,
        autocast: Any,
    ) -> None:
        from daemon.training.data import pad_token_id
        from daemon.training.encoding import chat_template_of

        self.model, self.tokenizer, self.autocast = model, tokenizer, autocast
        self.max_length, self.batch_size = max(2, max_length), max(1, batch_size)
        self.template = chat_template_of(tokenizer)
        self.pad = pad_token_id(tokenizer)

    @classmethod
    def for_file(cls, prepared: PreparedFile, flags: Flags) -> Scorer:
        """The scorer of ``prepared``'s model with the run's flags: ``--max_seq_length`` windows,
        ``--per_device_eval_batch_size`` of them a pass, in the training precision."""
        args = flags.training
        batch, autocast = args.per_device_eval_batch_size, autocast_dtype(args.bf16, args.fp16)
        return cls(prepared.model, prepared.tokenizer, flags.data.max_seq_length, batch, autocast)

    def score(self, piece: Slice, start: int, stop: int, into: SliceScore) -> None:
        """Add examples ``[start, stop)`` of ``piece`` (subset order) to ``into``, one entry each.

        The windows of up to :data:`SORTED_WINDOWS` at a time are batched longest first, and a
        window shorter than half of its batch's widest starts a new batch: no window is padded to
        more than twice its length. (A held-out block of ``max_seq_length`` tokens is one full
        window and a window of 2 tokens, since its text starts after an EOS; batched in order,
        every such pair padded the 2-token one to a full window and doubled the evaluation's cost.)
        """
        pending: list[tuple[list[int], list[int], int]] = []
        for record in piece.records[start:stop]:
            input_ids, labels, covered = encode_example(record, piece.shape, self.tokenizer, self.template)
            into.example_nats.append(0.0)
            into.example_tokens.append(0)
            into.bytes += covered
            for window_ids, window_labels in windows(input_ids, labels, self.max_length):
                pending.append((window_ids, window_labels, into.examples - 1))
            if len(pending) >= SORTED_WINDOWS:
                self._forward_by_length(pending, into)
                pending = []
        self._forward_by_length(pending, into)

    def _forward_by_length(self, pending: list[tuple[list[int], list[int], int]], into: SliceScore) -> None:
        """Forward ``pending`` windows ``(ids, labels, example)`` in batches of similar length (see :meth:`score`)."""
        pending.sort(key=lambda window: len(window[0]), reverse=True)
        batch: list[tuple[list[int], list[int], int]] = []
        for window in pending:
            if batch and (len(batch) == self.batch_size or 2 * len(window[0]) <= len(batch[0][0])):
                self._forward(batch, into)
                batch = []
            batch.append(window)
        if batch:
            self._forward(batch, into)

    def _forward(self, batch: list[tuple[list[int], list[int], int]], into: SliceScore) -> None:
        """One forward pass over right-padded windows: ids ``(batch, time)``, logits ``(batch, time, vocab)``."""
        import torch
        import torch.nn.functional as F

        mark_progress()
        width = max(len(ids) for ids, _, _ in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (window_ids, window_labels, _) in enumerate(batch):
            ids[row, : len(window_ids)] = torch.tensor(window_ids)
            labels[row, : len(window_labels)] = torch.tensor(window_labels)
            mask[row, : len(window_ids)] = 1
        device = self.model.device
        self.model.eval()
        autocast = torch.autocast(device.type, self.autocast or torch.bfloat16, enabled=self.autocast is not None)
        with torch.inference_mode(), autocast:
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        targets = labels[:, 1:].to(device)  # (batch, time - 1): position t predicts token t + 1
        # Flattened to (batch * (time - 1), vocab), rows contiguous: faster on a CPU than the
        # (batch, vocab, time - 1) view of a transpose, which strides across the vocabulary (BENCHMARKS.md).
        predictions = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        nats = F.cross_entropy(predictions, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
        nats = nats.view(targets.shape)
        per_window = zip(nats.sum(1).tolist(), (targets != IGNORE_INDEX).sum(1).tolist(), strict=True)
        for (_, _, example), (window_nats, window_tokens) in zip(batch, per_window, strict=True):
            into.example_nats[example] += window_nats
            into.example_tokens[example] += window_tokens


def plan_examples(
    slices: list[Slice], tokens_per_example: list[float], seconds_left: float, seconds_per_token: float
) -> int:
    """The ``k`` of the subset: :data:`MIN_EXAMPLES` times the largest power of two whose extra examples fit.

    Args:
        slices: the slices other than the file's own.
        tokens_per_example: of each slice, the mean learned tokens of its examples scored so far.
        seconds_left: budget left once the first :data:`MIN_EXAMPLES` of every slice are scored.
        seconds_per_token: measured so far.

    Returns:
        ``k >= MIN_EXAMPLES``: scoring examples ``[MIN_EXAMPLES, k)`` of every slice is
        predicted to take at most ``seconds_left``.
    """
    largest = max((len(s.records) for s in slices), default=0)
    k = MIN_EXAMPLES
    while k < largest:
        extra = [max(0, min(2 * k, len(s.records)) - MIN_EXAMPLES) for s in slices]
        tokens = sum(n * size for n, size in zip(extra, tokens_per_example, strict=True))
        if tokens * seconds_per_token > seconds_left:
            break
        k *= 2
    return k


def evaluate_suite(
    scorer: Scorer, own: Slice | None, others: list[Slice], budget_seconds: float, whole: frozenset[str] = frozenset()
) -> SuiteResult:
    """Score the model on its file's own slice (whole) and on every other slice (the budgeted subset).

    Args:
        scorer: the model to score.
        own: the file's held-out slice, or None for a file too small to spare one.
        others: the earlier held-out slices and the eval files (:func:`daemon.store.suite.load_suite`).
        budget_seconds: ``--eval_budget`` x the file's training seconds.
        whole: names of slices of ``others`` scored whole after every file, like the own slice, before the
            budget is planned (the base-model slice: the one measure of general ability, small by design).

    Returns:
        Scores in the order ``own, *others``. A slice whose scoring raised is an error
        ``{"slice", "error"}`` instead (logged with its traceback): never the end of the file.
    """
    result = SuiteResult(budget_seconds=budget_seconds, examples_per_slice=MIN_EXAMPLES)
    started = time.monotonic()
    scores = {s.name: SliceScore(s.name, s.kind) for s in ([own] if own else []) + others}
    failed: set[str] = set()

    def run(piece: Slice, start: int, stop: int) -> None:
        if piece.name in failed or start >= min(stop, len(piece.records)):
            return
        try:
            scorer.score(piece, start, stop, scores[piece.name])
        except Exception as e:  # one bad slice is reported, never the end of the file
            failed.add(piece.name)
            result.errors.append({"slice": piece.name, "error": f"{type(e).__name__}: {e}"})
            logger.exception("evaluating slice %s failed", piece.name)

    if own is not None:
        run(own, 0, len(own.records))
    for piece in others:
        run(piece, 0, len(piece.records) if piece.name in whole else MIN_EXAMPLES)
    budgeted = [piece for piece in others if piece.name not in whole]
    tokens = sum(s.tokens for s in scores.values())
    if budgeted and tokens:
        elapsed = time.monotonic() - started
        mean = tokens / sum(s.examples for s in scores.values())
        sizes = [s.tokens / s.examples if s.tokens else mean for s in (scores[p.name] for p in budgeted)]
        k = plan_examples(budgeted, sizes, budget_seconds - elapsed, elapsed / tokens)
        for piece in budgeted:
            run(piece, MIN_EXAMPLES, k)
        result.examples_per_slice = k
    result.scores = [s for s in scores.values() if s.slice not in failed and s.tokens]
    result.seconds = time.monotonic() - started
    return result


@dataclass
class FileEvaluation:
    """The model after one file, scored on the suite: what the run records (empty on ranks other than 0).

    Attributes:
        rows: the model's ``evaluations.jsonl`` rows (:meth:`SliceScore.as_row`).
        own_slice: the file's held-out slice (its raw records), None without one.
        eval_loss: the loss on the own slice (nats), None without one.
        seconds: time spent scoring.
        forgetting: :func:`daemon.quality.forgetting.forgetting` of this model (None before a second held-out slice).
        quality_gate: :func:`daemon.quality.forgetting.quality_gate` of this file.
        evaluation: the status's ``evaluation``: slices, examples per slice, seconds, budget, errors.
        forward_transfer: :func:`daemon.quality.transfer.forward_transfer` (None without a before score).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    own_slice: Slice | None = None
    eval_loss: float | None = None
    seconds: float | None = None
    forgetting: dict[str, Any] | None = None
    quality_gate: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    forward_transfer: dict[str, Any] | None = None

    def record(self, status_dir: str | Path, start_step: int) -> None:
        """Add the own slice to the suite and the rows to ``evaluations.jsonl`` (above ``start_step``, where
        :func:`daemon.store.undo.undo_after` cleared what an earlier attempt at the file left)."""
        if self.own_slice is not None:
            write_slice(status_dir, self.own_slice.name, self.own_slice.records)
        write_rows(status_dir, start_step, self.rows)

    def snapshot_fields(self) -> dict[str, Any]:
        """What the evolution snapshot adds: the rows, forgetting, quality gate, the evaluation's cost and
        forward transfer."""
        return {"evaluations": self.rows, **self.status_fields()}

    def status_fields(self) -> dict[str, Any]:
        """The status's ``forgetting``, ``quality_gate``, ``evaluation`` and ``forward_transfer``, latest model:
        the fields a snapshot keeps and a rollback reads back (:data:`daemon.store.status.SNAPSHOT_FIGURES`)."""
        return {key: getattr(self, key) for key in SNAPSHOT_FIGURES}


def evaluate_file(prepared: PreparedFile, flags: Flags, train_seconds: float, spent: float = 0.0) -> FileEvaluation:
    """Score the model after ``prepared``'s file on the suite, and apply the quality gate.

    ``spent`` seconds of the budget went to scoring before the file (:mod:`daemon.training.transfer`).

    Raises:
        RegressionError: the gate says roll back (``--on_regression rollback``); nothing was
            written yet, and the caller's failure path rolls the file back.
    """
    started = time.monotonic()
    plan, scan, status_dir = prepared.plan, prepared.scan, flags.status.status_dir
    name = printable(scan.path.name)
    own = own_slice(prepared)
    others, errors = load_suite(
        status_dir, plan.start_step, flags.evaluation.eval_files, flags.data.text_field, flags.data.max_eval_examples
    )
    scorer = Scorer.for_file(prepared, flags)
    budget = flags.evaluation.eval_budget * train_seconds
    whole = frozenset({slice_name(0, BASE_FILE)})  # 24 short answers: drift from the base, never a 1-example read
    result = evaluate_suite(scorer, own, others, budget - spent - (time.monotonic() - started), whole)  # reading counts
    result.errors[:0] = errors
    result.budget_seconds, result.seconds = budget, time.monotonic() - started + spent
    rows = [score.as_row(plan.max_steps, name, scan.sha256) for score in result.scores]
    earlier = [row for row in read_rows(status_dir) if row["step"] <= plan.start_step]
    own_name = own.name if own else None
    gate = quality_gate(rows_at(earlier, plan.start_step), rows, own_name, result.errors, flags.evaluation)
    own_loss = next((row["loss"] for row in rows if row["slice"] == own_name), None)
    evaluation = {
        "slices": len(rows),
        "examples_per_slice": result.examples_per_slice,
        "seconds": round(result.seconds, 2),
        "budget_seconds": round(result.budget_seconds, 2),
        "errors": result.errors,
    }
    subsets = [o for o in others if o.name not in whole]  # the slices the budget cuts to their first k examples
    k = result.examples_per_slice
    logger.info(
        "evaluated %s in %.1f s (%s, budget %.1f s%s)%s",
        counted(len(rows), "slice"),
        result.seconds,
        f"{spent:.1f} s of it before training" if spent else "after training",
        result.budget_seconds,
        f", other slices on up to {counted(k, 'example')} each" if subsets else "",
        f"; {counted(len(result.errors), 'slice')} failed" if result.errors else "",
    )
    if gate["action"] != "none":
        logger.warning("%s: %s", name, gate_message(gate, plan.start_step))
    if gate["action"] == "rollback":
        raise RegressionError(gate_message(gate, plan.start_step), gate)
    fgt = forgetting(earlier + rows, plan.max_steps)
    return FileEvaluation(rows, own, own_loss, result.seconds, fgt, gate, evaluation)


def own_slice(prepared: PreparedFile) -> Slice | None:
    """The file's held-out slice as the evaluation scores it (whole, in subset order); None for a file without one."""
    if not prepared.datasets.heldout_records:
        return None
    records = subset(prepared.datasets.heldout_records)
    return Slice(slice_name(prepared.plan.max_steps, prepared.scan.path.name), HELD_OUT, prepared.scan.shape, records)


def autocast_dtype(bf16: bool, fp16: bool) -> Any:
    """The autocast dtype of the training precision (None: fp32), so scores match what training computes."""
    import torch

    return torch.bfloat16 if bf16 else torch.float16 if fp16 else None
