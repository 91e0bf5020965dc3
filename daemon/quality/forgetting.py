"""The forgetting matrix, forgetting and backward transfer, and the quality gate (docs/evaluation.md).

``status/evaluations.jsonl`` holds one row per (model after a file, slice), built by
:meth:`daemon.training.evaluation.SliceScore.as_row`: ``step, after_file, sha256, slice, kind,
examples, tokens, bytes, loss, perplexity, bits_per_byte, prefix_loss``. The rows of one model (one
``step``) are written together: :func:`write_rows` rewrites the file atomically (temporary
file, fsync, rename), so a reader sees all the rows of a step or none, and the rewrite drops
the rows of steps above the file's start (a file rolled back, or failed after its rows were
written), so the file holds only models of the running line.

**The matrix** (:func:`build_matrix`): files as rows in step order, slices as columns (held-out
slices in the order their files were done, then the eval files); a cell is the loss of the
slice after the file. A held-out column starts at its own file's row: a lower-triangular
matrix, plus a full column per eval file.

**Forgetting** follows Avalanche (ContinualAI, ``avalanche/evaluation/metrics/forgetting_bwt.py``):
an experience's forgetting is the difference between its metric right after it was trained
and its metric now (``Forgetting.result``: initial - last, for an accuracy); the stream's is the
mean over the experiences trained before the current one (``StreamForgetting``: the experience
just trained and any never trained are left out); backward transfer is minus the forgetting
(``forgetting_to_bwt``). A loss falls as the model learns, so the difference is turned round
and positive still means forgot. For the model after file ``i`` and each earlier file ``j``:

    forgetting_j(i)      = loss_j(after file i) - loss_j(after file j)     (nats)
    forgetting(i)        = mean over j < i of forgetting_j(i)  (also max, and the worst slice)
    backward_transfer(i) = -forgetting(i)

Eval files are never trained, so, as in Avalanche, they have no forgetting. The matrix's
change is each cell's loss minus its slice's first loss: for a held-out slice, its forgetting.

Every comparison of two evaluations of a slice is on the same examples: the budget may give
them different ``examples`` (the ``k`` of the subset), so both losses are taken over the first
``min(examples)`` of the subset, from the rows' ``prefix_loss`` (:func:`matched_losses`).

**The quality gate** (:func:`quality_gate`): ``regression`` is the mean, over the slices scored
both by the model before the file (the rows at its start step) and after it, except the file's
own slice, of ``loss after - loss before`` (nats): the rise in the mean loss on what the model
already knew. Above ``--max_regression`` the file is kept and reported (``warn``) or rolled
back (``rollback``); a slice that could not be scored makes the gate ``warn``, never a silent pass.

Standard library only: ``python -m daemon status`` runs in the daemon process, without torch.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.names import counted
from daemon.quality.transfer import format_transfer, own_rows, row_numbers
from daemon.store.files import atomic_write_text, read_json_lines
from daemon.store.suite import EVAL_FILE, HELD_OUT

if TYPE_CHECKING:
    from daemon.config import EvaluationArguments

logger = logging.getLogger(__name__)

EVALUATIONS_FILE = "evaluations.jsonl"


def read_rows(status_dir: str | Path) -> list[dict[str, Any]]:
    """Every row of ``evaluations.jsonl``, oldest step first (empty if none; an unreadable line is skipped)."""
    rows = read_json_lines(Path(status_dir) / EVALUATIONS_FILE)
    return sorted(rows, key=lambda row: row["step"])


def write_rows(status_dir: str | Path, start_step: int, rows: list[dict[str, Any]]) -> None:
    """Record one model's rows: keep the rows of steps up to ``start_step``, add ``rows``, replace the file."""
    kept = [row for row in read_rows(status_dir) if row["step"] <= start_step]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept + rows)
    atomic_write_text(Path(status_dir) / EVALUATIONS_FILE, text)


def rows_at(rows: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    """The rows of the model at ``step``."""
    return [row for row in rows if row["step"] == step]


def matched_losses(earlier: dict[str, Any], later: dict[str, Any]) -> tuple[float, float] | None:
    """The losses of two rows of one slice over the same examples: the first ``min(examples)`` of the subset.

    Returns:
        ``(earlier loss, later loss)`` in nats, or None when either has no loss there.
    """
    n = str(min(earlier["examples"], later["examples"]))
    a = earlier.get("prefix_loss", {}).get(n, earlier["loss"] if str(earlier["examples"]) == n else None)
    b = later.get("prefix_loss", {}).get(n, later["loss"] if str(later["examples"]) == n else None)
    return None if a is None or b is None else (a, b)


def _first_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``slice -> row`` of each slice's first evaluation (rows oldest first)."""
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        first.setdefault(row["slice"], row)
    return first


def _changes(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, float]:
    """``slice -> later loss - earlier loss`` over matched examples, for ``(earlier, later)`` row pairs."""
    out = {}
    for earlier, later in pairs:
        losses = matched_losses(earlier, later)
        if losses is not None:
            out[later["slice"]] = losses[1] - losses[0]
    return out


def forgetting(rows: list[dict[str, Any]], step: int) -> dict[str, Any] | None:
    """Avalanche's forgetting and backward transfer (module docstring) of the model at ``step``.

    Args:
        rows: evaluation rows up to ``step``, oldest first.
        step: the model's ``global_step``.

    Returns:
        ``{"mean", "max", "worst_slice", "backward_transfer", "slices"}`` in nats over the
        held-out slices of files done before the model's own, or None when there is none.
    """
    first = _first_rows(rows)
    now = [row for row in rows_at(rows, step) if row["kind"] == HELD_OUT and first[row["slice"]]["step"] < step]
    changes = _changes([(first[row["slice"]], row) for row in now])
    if not changes:
        return None
    mean = sum(changes.values()) / len(changes)
    worst = max(changes, key=lambda name: _ordered(changes[name]))
    return {
        "mean": mean,
        "max": changes[worst],
        "worst_slice": worst,
        "backward_transfer": -mean,
        "slices": len(changes),
    }


def _ordered(value: float) -> float:
    """A change as a sort key: NaN (a broken model) ranks above everything."""
    return math.inf if math.isnan(value) else value


def quality_gate(
    before: list[dict[str, Any]],
    after: list[dict[str, Any]],
    own_slice: str | None,
    errors: list[dict[str, str]],
    args: EvaluationArguments,
) -> dict[str, Any]:
    """The quality gate of one file (module docstring).

    Args:
        before: the rows of the model before the file (at its start step); empty for the first file.
        after: the rows of the model after it.
        own_slice: the file's own held-out slice, left out of the comparison.
        errors: slices that could not be scored.
        args: ``--max_regression`` and ``--on_regression``.

    Returns:
        ``{"max_regression", "on_regression", "regression", "worst_slice", "worst_change",
        "slices", "exceeded", "action", "errors"}``: ``regression`` and ``worst_change`` in
        nats (None when no slice was scored both times); ``action`` is what is done: ``none``,
        ``warn`` or ``rollback``. A non-finite loss after the file exceeds any margin.
    """
    previous = {row["slice"]: row for row in before}
    changes = _changes([(previous[r["slice"]], r) for r in after if r["slice"] in previous and r["slice"] != own_slice])
    regression = sum(changes.values()) / len(changes) if changes else None
    worst = max(changes, key=lambda name: _ordered(changes[name])) if changes else None
    limit = args.max_regression
    exceeded = limit is not None and regression is not None and not regression <= limit  # NaN exceeds
    action = "none"
    if limit is not None and (exceeded or errors):
        action = args.on_regression if exceeded and not errors else "warn"
    return {
        "max_regression": limit,
        "on_regression": args.on_regression,
        "regression": regression,
        "worst_slice": worst,
        "worst_change": changes[worst] if worst is not None else None,
        "slices": len(changes),
        "exceeded": exceeded,
        "action": action,
        "errors": errors,
    }


def gate_message(gate: dict[str, Any], start_step: int) -> str:
    """One line on what the gate found and did, naming the regression and the worst slice."""
    parts = []
    if gate["exceeded"]:
        parts.append(
            f"quality gate: the mean loss over {gate['slices']} earlier slices rose by {gate['regression']:.4f} nats "
            f"(> --max_regression {gate['max_regression']}); worst slice {gate['worst_slice']} "
            f"({gate['worst_change']:+.4f} nats)"
        )
    if gate["errors"]:
        failed = "; ".join(f"{e['slice']}: {e['error']}" for e in gate["errors"][:3])
        parts.append(f"quality gate: {len(gate['errors'])} slices could not be scored ({failed})")
    outcome = {
        "rollback": f"rolled back to step {start_step} (--on_regression rollback)",
        "warn": "kept (--on_regression warn)" if not gate["errors"] else "kept: treated as warn",
        "none": "passed",
    }[gate["action"]]
    return "; ".join(parts + [outcome]) if parts else f"quality gate: {outcome}"


@dataclass
class Matrix:
    """The forgetting matrix: ``loss[i][j]`` is slice ``j``'s loss after file ``i`` (None: not evaluated).

    ``change[i][j]`` is ``loss[i][j]`` minus the slice's first loss (for a held-out slice,
    its forgetting); ``bits_per_byte[i][j]`` as the rows hold it. ``before[i]`` is the diagonal's
    "before": file ``i``'s own slice scored by the model it started from, before its first step
    (:mod:`daemon.quality.transfer`; None where not measured).
    """

    files: list[dict[str, Any]]
    slices: list[dict[str, Any]]
    loss: list[list[float | None]]
    change: list[list[float | None]]
    bits_per_byte: list[list[float | None]]
    before: list[float | None] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_matrix(rows: list[dict[str, Any]]) -> Matrix:
    """The matrix of the rows of ``evaluations.jsonl`` (module docstring)."""
    files: dict[int, str] = {}
    order: dict[str, str] = {}
    cells: dict[tuple[int, str], dict[str, Any]] = {}
    for row in rows:
        files.setdefault(row["step"], row["after_file"])
        order.setdefault(row["slice"], row["kind"])
        cells[(row["step"], row["slice"])] = row
    names = [n for n, kind in order.items() if kind != EVAL_FILE] + [
        n for n, kind in order.items() if kind == EVAL_FILE
    ]
    first = _first_rows(rows)
    steps = sorted(files)

    def grid(value: Any) -> list[list[float | None]]:
        return [[value(cells.get((step, name)), name) for name in names] for step in steps]

    def change(row: dict[str, Any] | None, name: str) -> float | None:
        return None if row is None else _changes([(first[name], row)]).get(name)

    return Matrix(
        files=[{"step": step, "after_file": files[step]} for step in steps],
        slices=[{"slice": name, "kind": order[name]} for name in names],
        loss=grid(lambda row, _: None if row is None else row["loss"]),
        change=grid(change),
        bits_per_byte=grid(lambda row, _: None if row is None else row["bits_per_byte"]),
        before=[next((r["before_loss"] for r in own_rows(rows) if r["step"] == step), None) for step in steps],
    )


LABEL_WIDTH = 22  # "  3 stdl~-11-03    312": number, abbreviated file name, step
CELL_WIDTH = 6  # " 4.56", "+0.12": two decimals of a nat (--json has every figure)


def _abbreviate(name: str, width: int) -> str:
    """``name`` in ``width`` characters: its start, ``~`` and its end (where dated drops differ)."""
    return name if len(name) <= width else name[:4] + "~" + name[len(name) - (width - 5) :]


def format_matrix(rows: list[dict[str, Any]], width: int = 100, max_files: int = 10) -> list[str]:
    """The matrix for a terminal: losses, then changes, every line at most ``width`` characters.

    Rows are the last ``max_files`` files; columns are named by the number of the file whose
    held-out slice they are (``#3``) or ``e1``, ``e2``... for eval files, as many as fit
    (eval files first, then the latest held-out slices); a note says what was left out.
    """
    m = build_matrix(rows)
    if not m.files:
        return []
    numbers = row_numbers([f["step"] for f in m.files])
    number = {f["step"]: n for f, n in zip(m.files, numbers, strict=True)}
    evals = [j for j, s in enumerate(m.slices) if s["kind"] == EVAL_FILE]
    held = [j for j, s in enumerate(m.slices) if s["kind"] != EVAL_FILE]
    fit = max(1, (width - LABEL_WIDTH) // CELL_WIDTH)
    shown_evals = evals[:fit]
    shown = sorted(held[max(0, len(held) - (fit - len(shown_evals))) :] + shown_evals)
    first_step = {r["slice"]: r["step"] for r in reversed(rows)}  # rows oldest first: the first wins
    labels = {j: f"#{number.get(first_step[m.slices[j]['slice']], '?')}" for j in shown if j in held}
    labels |= {j: f"e{n}" for n, j in enumerate(shown_evals, start=1)}
    header = " " * LABEL_WIDTH + "".join(f"{labels[j]:>{CELL_WIDTH}}" for j in shown)
    first_row = max(0, len(m.files) - max_files)

    def table(grid: list[list[float | None]], spec: str) -> list[str]:
        lines = [header]
        for i in range(first_row, len(m.files)):
            name = _abbreviate(Path(m.files[i]["after_file"]).stem, 11)
            cells = "".join(f"{'.' if grid[i][j] is None else format(grid[i][j], spec):>{CELL_WIDTH}}" for j in shown)
            lines.append(f"{numbers[i]:>3} {name:<11} {m.files[i]['step']:>6}" + cells)
        return lines

    lines = ["evaluations  loss in nats on each slice (columns) after each file (rows)"]
    lines += table(m.loss, ".2f")
    lines += ["change since each slice's first evaluation, in nats (+ = forgot: a held-out slice's forgetting)"]
    lines += table(m.change, "+.2f")
    hidden = [f"{first_row} earlier files"] * bool(first_row)
    hidden += [f"{len(m.slices) - len(shown)} older slices"] * bool(len(m.slices) - len(shown))
    if hidden:
        lines.append(f"not shown: {', '.join(hidden)} (python -m daemon status --json has every figure)")
    lines += [f"e{n} = {m.slices[j]['slice']}" for n, j in enumerate(shown_evals, start=1)]
    lines += format_transfer(rows, max_files)
    return [_fit(line, width) for line in lines]


def format_figures(doc: dict[str, Any], width: int = 100) -> list[str]:
    """The status's ``quality_gate`` and ``evaluation`` as summary lines of at most ``width``.

    Its ``forgetting`` and ``forward_transfer`` are the summary's lines (:func:`daemon.views.summary.format_summary`),
    printed above these by ``python -m daemon status``: they were printed twice, the second cut at ``width``.
    """
    lines = []
    gate = doc.get("quality_gate")
    if gate and (gate.get("regression") is not None or gate.get("errors")):
        limit = "gate off" if gate["max_regression"] is None else f"limit {gate['max_regression']}"
        found = "-" if gate["regression"] is None else f"{gate['regression']:+.3f}"
        worst = gate["worst_slice"] and f", worst {_short(gate['worst_slice'])} {gate['worst_change']:+.3f}"
        lines.append(f"quality gate {gate['action']}: regression {found} ({limit}, {gate['slices']} slices){worst}")
    ev = doc.get("evaluation")
    if ev:
        lines.append(
            f"evaluation   {counted(ev['slices'], 'slice')}, up to {counted(ev['examples_per_slice'], 'example')} "
            f"each, {ev['seconds']:.1f} s of {ev['budget_seconds']:.1f} s budget, "
            f"{counted(len(ev['errors']), 'slice')} failed"
        )
        lines += [f"  failed {e['slice']}: {e['error']}" for e in ev["errors"]]
    return [_fit(line, width) for line in lines]


def _short(slice_name: str, width: int = 22) -> str:
    """A slice's name for a summary line: its step without leading zeros, abbreviated to ``width``."""
    return _abbreviate(re.sub(r"^0+(?=\d)", "", slice_name), width)  # step 0 keeps its 0: "0-base-model"


def _fit(line: str, width: int) -> str:
    """``line`` cut to ``width`` characters, a cut marked with ``~``."""
    return line if len(line) <= width else line[: width - 1] + "~"
