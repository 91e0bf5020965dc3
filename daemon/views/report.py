"""``status/report.html``: one self-contained page on the running model (docs/operating.md "Seeing it").

:func:`write_report` reads only the status folder and writes one HTML file with no
reference outside itself (the plots are PNG images embedded as ``data:`` URIs; no
script, no stylesheet link), so it opens from disk, from a mail, or on a machine without
a network. It holds:

- the training loss over ``global_step`` (``status/loss.jsonl``, one point per logging
  step) with the file boundaries of ``history.jsonl`` marked; before any point was
  recorded, each file's mean training loss over its steps;
- each file's loss on its own held-out slice (``history.jsonl`` ``eval_loss``);
- the forgetting matrix as a heat map (:func:`daemon.quality.forgetting.build_matrix`): files as rows,
  slices as columns;
- tokens per second per file (the last logged rate of each file's run);
- the queue, the failed and rolled-back files with their reasons, the last error;
- the latest evolution snapshot's samples.

The training process rewrites it after every file (:func:`write_report_logged`: a report
that cannot be drawn is logged and never fails the file); ``python -m daemon report``
draws it on demand. matplotlib is imported only when a plot is drawn, through its
object-oriented API (``matplotlib.figure.Figure``, no pyplot and no global backend), so
importing this module costs nothing and drawing is safe beside other threads.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.config_file import command_parser, parse_command
from daemon.exceptions import ConfigError
from daemon.quality.forgetting import Matrix, build_matrix, read_rows
from daemon.quality.transfer import row_numbers
from daemon.store.files import atomic_write_text
from daemon.store.records import Outcome, utc_now
from daemon.store.status import StatusFile, latest_snapshot, read_history, read_loss_series, standing_done_rows
from daemon.store.suite import EVAL_FILE
from daemon.views.summary import num, summarize

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
FIGURE_WIDTH = 9.0  # inches at 100 dpi: a 900-pixel plot fills the page's column
MAX_MATRIX_FILES = 40  # heat-map rows; older files are left out (the note says so)
MAX_MATRIX_SLICES = 40


@dataclass
class ReportData:
    """What the report shows, read from one status folder (:func:`gather`).

    Attributes:
        status: ``training_status.json`` (every field present).
        history: ``history.jsonl`` rows, oldest first.
        loss: the running model's ``loss.jsonl`` points (:func:`daemon.store.status.read_loss_series`).
        matrix: the forgetting matrix of ``evaluations.jsonl``.
        snapshot: the latest evolution snapshot's ``snapshot.json``, None before the first.
    """

    status: dict[str, Any]
    history: list[dict[str, Any]]
    loss: list[dict[str, Any]]
    matrix: Matrix
    snapshot: dict[str, Any] | None

    @property
    def done(self) -> list[dict[str, Any]]:
        """The done files whose steps are in the model (no rollback took them out), oldest first."""
        return standing_done_rows(self.history)


def gather(status_dir: str | os.PathLike[str]) -> ReportData:
    """Read everything the report shows from ``status_dir`` (missing files read as empty)."""
    status = StatusFile(status_dir).read()
    folder = latest_snapshot(status_dir, status.get("global_step"))  # a rolled-back file's is not the latest
    snapshot = None
    if folder is not None:
        try:
            snapshot = json.loads((folder / "snapshot.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("%s/snapshot.json cannot be read; the report shows no samples", folder)
    return ReportData(
        status=status,
        history=read_history(status_dir),
        loss=read_loss_series(status_dir),
        matrix=build_matrix(read_rows(Path(status_dir))),
        snapshot=snapshot,
    )


# ---------------------------------------------------------------------------------------------- plots


def _figure(height: float) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(FIGURE_WIDTH, height), dpi=100, layout="constrained")
    return fig


def loss_figure(data: ReportData) -> Figure | None:
    """Training loss (nats) over ``global_step``, a dashed line at each done file's end; None without data.

    Without ``loss.jsonl`` points (a status folder from before it existed), each done file's
    mean training loss is drawn as a flat segment over its steps.
    """
    fig = _figure(3.6)
    ax = fig.add_subplot()
    if data.loss:
        ax.plot([p["step"] for p in data.loss], [p["loss"] for p in data.loss], lw=1.2, label="training loss")
    else:
        rows = [r for r in data.done if r.get("train_loss") is not None]
        if not rows:
            return None
        for r in rows:
            ax.plot([r["start_step"], r["end_step"]], [r["train_loss"]] * 2, color="C0", lw=2)
        ax.plot([], [], color="C0", lw=2, label="mean training loss of each file")
    for i, r in enumerate(data.done, start=1):  # each file's steps shaded in turn, named at the top
        ax.axvspan(r["start_step"], r["end_step"], color="0.92" if i % 2 else "0.97", lw=0, zorder=0)
        ax.axvline(r["end_step"], color="0.6", ls="--", lw=0.7, zorder=1)
        ax.text(
            (r["start_step"] + r["end_step"]) / 2,
            1.0,
            f"{i}",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xlabel("global_step (shaded: the steps of each done file, numbered as in the tables below)")
    ax.set_ylabel("loss (nats)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def heldout_figure(data: ReportData) -> Figure | None:
    """Each done file's loss on its own held-out slice, right after training on it; None without any."""
    rows = [r for r in data.done if r.get("eval_loss") is not None]
    if not rows:
        return None
    fig = _figure(2.6)
    ax = fig.add_subplot()
    ax.bar(range(len(rows)), [r["eval_loss"] for r in rows], color="C1")
    _file_ticks(ax, rows)
    ax.set_ylabel("held-out loss (nats)")
    ax.grid(axis="y", alpha=0.3)
    return fig


def matrix_figure(matrix: Matrix) -> Figure | None:
    """The forgetting matrix as a heat map: files as rows (in step order), slices as columns; None if empty.

    A cell is the loss (nats) of the column's slice after the row's file, written in the cell
    when the matrix is small enough to read; a blank cell was not evaluated (a held-out slice
    before its file was trained). A row's label adds its own slice's loss before the file was
    trained (forward transfer, :mod:`daemon.quality.transfer`), the diagonal's "before". Columns are
    named ``#n`` (file ``n``'s held-out slice) or ``e1``, ``e2``... (eval files), as
    ``python -m daemon status`` names them.
    """
    if not matrix.files:
        return None
    import numpy as np

    rows = range(max(0, len(matrix.files) - MAX_MATRIX_FILES), len(matrix.files))
    cols = range(min(len(matrix.slices), MAX_MATRIX_SLICES))
    grid = np.array([[math.nan if matrix.loss[i][j] is None else matrix.loss[i][j] for j in cols] for i in rows])
    fig = _figure(max(2.4, 0.42 * len(rows) + 1.6))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis_r", aspect="auto")
    fig.colorbar(image, ax=ax, label="loss (nats)")
    numbers = row_numbers([f["step"] for f in matrix.files])
    ax.set_yticks(range(len(rows)), [_file_label(matrix, i, numbers[i]) for i in rows])
    ax.set_xticks(range(len(cols)), [_slice_label(matrix, j, numbers) for j in cols], fontsize=8)
    ax.set_xlabel("evaluation slice")
    ax.set_ylabel("after file")
    if grid.size <= 150:
        finite = grid[np.isfinite(grid)]
        middle = float(finite.mean()) if finite.size else 0.0
        for (r, c), value in np.ndenumerate(grid):
            if math.isfinite(value):
                colour = "white" if value > middle else "black"
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    return fig


def throughput_figure(data: ReportData) -> Figure | None:
    """Tokens per second of each done file's training (its last logged rate); None without any."""
    rates = {}
    for point in data.loss:  # in step order: the last point of a file is its whole run's rate
        if point.get("tokens_per_second"):
            rates[point["file"]] = point["tokens_per_second"]
    rows = [r for r in data.done if r["file"] in rates]
    if not rows:
        return None
    fig = _figure(2.6)
    ax = fig.add_subplot()
    ax.bar(range(len(rows)), [rates[r["file"]] for r in rows], color="C2")
    _file_ticks(ax, rows)
    ax.set_ylabel("tokens / s")
    ax.grid(axis="y", alpha=0.3)
    return fig


def _file_ticks(ax: Any, rows: list[dict[str, Any]]) -> None:
    labels = [f"{i} {_short(r['file'], 26)}" for i, r in enumerate(rows, start=1)]
    ax.set_xticks(
        range(len(rows)), labels, rotation=30 if len(rows) > 4 else 0, ha="right" if len(rows) > 4 else "center"
    )


def _file_label(matrix: Matrix, i: int, number: int) -> str:
    """``"3 name"`` (``number``: row ``i``'s, :func:`row_numbers`), with ``(before 6.12)`` where the file's own slice
    was scored before training on it."""
    before = matrix.before[i] if i < len(matrix.before) else None
    return f"{number} {_short(matrix.files[i]['after_file'], 24)}" + (
        "" if before is None else f" (before {before:.2f})"
    )


def _slice_label(matrix: Matrix, column: int, numbers: list[int]) -> str:
    evals = [s["slice"] for s in matrix.slices if s["kind"] == EVAL_FILE]
    name = matrix.slices[column]["slice"]
    if name in evals:
        return f"e{evals.index(name) + 1}"
    first = next((i for i, row in enumerate(matrix.loss) if row[column] is not None), None)
    return "?" if first is None else f"#{numbers[first]}"


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width // 2 - 1] + "~" + name[-(width - width // 2) :]


def png_data_uri(fig: Figure) -> str:
    """The figure as a ``data:image/png;base64,...`` URI (embedded: the report needs no other file)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------- page

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; max-width: 960px; margin: 1.5em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
img { max-width: 100%; height: auto; display: block; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: .2em .6em; border-bottom: 1px solid #eee;
  text-align: left; vertical-align: top; } th { background: #f6f6f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: .6em; white-space: pre-wrap; word-break: break-word; }
.note { color: #666; } .error { color: #a00; }
"""


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _plot(fig: Figure | None, alt: str, css_class: str, missing: str) -> str:
    if fig is None:
        return f'<p class="note">{_e(missing)}</p>'
    return f'<img class="{css_class}" alt="{_e(alt)}" src="{png_data_uri(fig)}">'


def render_html(data: ReportData) -> str:
    """The report page for ``data``: one HTML document, every text escaped, plots embedded."""
    doc = data.status
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Training report: step {_e(doc.get('global_step'))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Continuous training report</h1>",
        _summary(data),
        "<h2>Training loss</h2>",
        _plot(
            loss_figure(data),
            "training loss over global_step; dashed lines are file boundaries",
            "loss",
            "No training loss recorded yet.",
        ),
        "<h2>Held-out loss per file</h2>",
        _plot(heldout_figure(data), "held-out loss per file", "heldout", "No file had a held-out slice yet."),
        "<h2>Forgetting matrix</h2>",
        '<p class="note">Loss in nats of each evaluation slice (columns) after each file (rows); '
        "#n is file n's held-out slice (#0 the base model's own answers, on a pretrained line), "
        "e1, e2... the eval files.</p>",
        _plot(
            matrix_figure(data.matrix),
            "forgetting matrix heat map: files as rows, slices as columns",
            "heatmap",
            "No evaluations yet.",
        ),
        _matrix_note(data.matrix),
        "<h2>Throughput</h2>",
        _plot(throughput_figure(data), "tokens per second per file", "throughput", "No throughput recorded yet."),
        "<h2>Files</h2>",
        _files(data),
        "<h2>Latest samples</h2>",
        _samples(data.snapshot),
        f'<p class="note">Written {_e(utc_now())} by <code>python -m daemon report</code>.</p>',
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _summary(data: ReportData) -> str:
    s = summarize(data.status)
    rows = [
        ("state", f"{s.state} (updated {s.updated_at})"),
        ("global_step", f"{s.global_step} of max_steps {s.max_steps}"),
        ("files", s.files),
        ("metrics", s.metrics),
    ]
    cur = s.current_file
    if cur and cur.steps:
        rows.append(("current file", f"{cur.name}: step {cur.steps} ({cur.percent}), eta {cur.eta}"))
    figures = (("last eval", s.last_eval), ("forgetting", s.forgetting), ("forward transfer", s.forward_transfer))
    rows += [(label, text) for label, text in figures if text]
    cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="summary">{cells}</table>'


def _matrix_note(matrix: Matrix) -> str:
    hidden = []
    if len(matrix.files) > MAX_MATRIX_FILES:
        hidden.append(f"{len(matrix.files) - MAX_MATRIX_FILES} earlier files")
    if len(matrix.slices) > MAX_MATRIX_SLICES:
        hidden.append(f"{len(matrix.slices) - MAX_MATRIX_SLICES} later slices")
    evals = [s["slice"] for s in matrix.slices if s["kind"] == EVAL_FILE]
    names = ", ".join(f"e{n} = {name}" for n, name in enumerate(evals, start=1))
    note = f"Not shown: {', '.join(hidden)} (python -m daemon status --json has every figure). " if hidden else ""
    return f'<p class="note">{_e(note + names)}</p>' if note or names else ""


def _files(data: ReportData) -> str:
    doc = data.status
    queue = doc.get("queue") or []
    out = [f"<p>Queue ({len(queue)}): {_e(', '.join(queue)) if queue else 'empty'}</p>"]
    done = "".join(
        f"<tr><td>{i}</td><td>{_e(r['file'])}</td><td class=num>{_e(r['start_step'])} &rarr; {_e(r['end_step'])}</td>"
        f"<td class=num>{num(r.get('train_loss'), '.3f')}</td><td class=num>{num(r.get('eval_loss'), '.3f')}</td>"
        f"<td class=num>{num(r.get('wall_seconds'), '.0f')}</td></tr>"
        for i, r in enumerate(data.done, start=1)
    )
    if done:
        out.append(
            "<table><tr><th>#</th><th>done</th><th>steps</th><th>train loss</th><th>held-out loss</th>"
            f"<th>seconds</th></tr>{done}</table>"
        )
    bad = [r for r in data.history if r.get("outcome") in (Outcome.FAILED, Outcome.ROLLED_BACK)]
    if bad:
        cells = "".join(
            f"<tr><td>{_e(r['outcome'])}</td><td>{_e(r['file'])}</td><td class=error>{_e(r.get('error'))}</td>"
            f"<td>{_e(r.get('finished_at'))}</td></tr>"
            for r in bad
        )
        out.append(
            f'<table class="failed"><tr><th>outcome</th><th>file</th><th>reason</th><th>at</th></tr>{cells}</table>'
        )
    else:
        out.append("<p>No failed files.</p>")
    err = doc.get("last_error")
    if err:
        out.append(
            f'<p class="error">Last error: {_e(err.get("file"))}: {_e(err.get("message"))} ({_e(err.get("at"))})</p>'
        )
    return "\n".join(out)


def _samples(snapshot: dict[str, Any] | None) -> str:
    if not snapshot or not snapshot.get("samples"):
        return '<p class="note">No samples yet.</p>'
    settings = json.dumps(snapshot.get("generation"))
    head = f"<p>After {_e(snapshot.get('file'))} (step {_e(snapshot.get('step'))}), settings {_e(settings)}</p>"
    joint = "\n" if any(s.get("chat") for s in snapshot["samples"]) else ""  # a chat answer below its prompt
    blocks = [f"<pre><b>{_e(s.get('prompt'))}</b>{joint}{_e(s.get('completion'))}</pre>" for s in snapshot["samples"]]
    return head + "\n".join(blocks)


# ---------------------------------------------------------------------------------------------- writing


def write_report(status_dir: str | os.PathLike[str]) -> Path:
    """Draw ``<status_dir>/report.html`` from the folder's files and replace it atomically.

    Returns:
        The report's path.

    Raises:
        OSError: the status folder cannot be written (the old report stays).
    """
    text = render_html(gather(status_dir))
    path = Path(status_dir) / REPORT_FILE
    atomic_write_text(path, text)
    return path


def write_report_logged(status_dir: str | os.PathLike[str]) -> Path | None:
    """:func:`write_report`, logging any failure instead of raising (the report never fails a file).

    Returns:
        The report's path, or None when it could not be written (the log says why).
    """
    try:
        return write_report(status_dir)
    except Exception:  # a bug in a plot must not fail a trained file: it is logged with its traceback
        logger.exception("could not write %s", Path(status_dir) / REPORT_FILE)
        return None


def main(argv: list[str]) -> int:
    """``python -m daemon report [--status_dir status] [--config FILE]``: write the report now and print its path."""
    parser = command_parser("python -m daemon report", "Write status/report.html.")
    try:
        args = parse_command(parser, argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    if not Path(args.status_dir).is_dir():
        print(f"error: {args.status_dir} is not a folder", file=sys.stderr, flush=True)
        return 1
    try:
        path = write_report(args.status_dir)
    except OSError as e:
        print(f"error: cannot write the report: {e}", file=sys.stderr, flush=True)
        return 1
    print(path)
    return 0
