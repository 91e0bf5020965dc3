"""The one summary of a status document: every figure formatted here once, laid out by three renderers.

:func:`summarize` reads ``training_status.json``'s fields (:func:`daemon.store.status.empty_status`)
into a :class:`Summary` of display strings; ``python -m daemon status`` prints
:func:`format_summary`, the live view (:mod:`daemon.views.live`) and ``status/report.html``
(:mod:`daemon.views.report`) lay the same strings out in their own way. A number therefore reads the
same in all three: loss to 4 decimals (nats), learning rate and gradient norm to 3 significant
digits, tokens per second with thousands separators, durations as ``h:mm:ss``, bytes in MB or GB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.names import counted


def num(value: Any, spec: str = "") -> str:
    """``value`` formatted with ``spec``; ``-`` for None (a figure not known yet)."""
    return "-" if value is None else format(value, spec)


def duration(seconds: float | None) -> str:
    """Seconds as ``m:ss``, or ``h:mm:ss`` from an hour; ``-`` for None."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def size(size_bytes: int) -> str:
    """Bytes as a short decimal figure: ``1.61 GB``, ``0.44 MB``."""
    return f"{size_bytes / 1e9:.2f} GB" if size_bytes >= 1e8 else f"{size_bytes / 1e6:.2f} MB"


@dataclass
class FileLine:
    """The file in training: its name and, once planned, ``steps`` done of planned, ``percent`` and ``eta``."""

    name: str
    steps: str | None = None  # "7/40"
    percent: str | None = None  # "18%"
    eta: str | None = None  # "0:41"
    size: str | None = None  # "40 examples, 1000 tokens"


@dataclass
class Summary:
    """A status document as display strings (see the module docstring for each figure's format)."""

    state: str
    pid: str
    updated_at: str
    global_step: str
    max_steps: str
    metrics: str  # "loss 2.3100  lr 0.0005  grad_norm 1.2  tokens/s 2,410"
    files: str  # "3 done, 1 failed, 2 queued[, 1 rolled back]"
    queue: list[str] = field(default_factory=list)
    current_file: FileLine | None = None
    last_eval: str | None = None
    grad_guard: str | None = None
    checkpoints: str | None = None
    disk: str | None = None
    forgetting: str | None = None
    forward_transfer: str | None = None  # "own slice 6.120 -> 5.310 nats, learned +0.810, forward +1.2 (mean ...)"
    last_error: str | None = None  # "file: message (at)"


def summarize(doc: dict[str, Any]) -> Summary:
    """The display strings of status document ``doc`` (missing fields read as not known yet)."""
    m = doc.get("metrics") or {}
    files = doc.get("files") or {}
    rolled = f", {files['rolled_back']} rolled back" if files.get("rolled_back") else ""
    summary = Summary(
        state=str(doc.get("state")),
        pid=num(doc.get("pid")),
        updated_at=num(doc.get("updated_at")),
        global_step=num(doc.get("global_step")),
        max_steps=num(doc.get("max_steps")),
        metrics=(
            f"loss {num(m.get('loss'), '.4f')}  lr {num(m.get('learning_rate'), '.3g')}  "
            f"grad_norm {num(m.get('grad_norm'), '.3g')}  tokens/s {num(m.get('tokens_per_second'), ',.0f')}"
        ),
        files=f"{files.get('done', 0)} done, {files.get('failed', 0)} failed, {files.get('queued', 0)} queued{rolled}",
        queue=list(doc.get("queue") or []),
    )
    cur = doc.get("current_file")
    if cur and cur.get("planned_steps"):
        summary.current_file = FileLine(
            name=str(cur.get("name")),
            steps=f"{cur.get('steps_done', 0)}/{cur['planned_steps']}",
            percent=f"{100 * cur.get('progress', 0):.0f}%",
            eta=duration(cur.get("eta_seconds")),
            size=f"{cur.get('examples')} examples, {cur.get('tokens')} tokens",
        )
    elif cur and cur.get("name"):
        summary.current_file = FileLine(name=str(cur["name"]))
    ev = doc.get("last_eval")
    if ev:
        summary.last_eval = (
            f"step {ev['step']} on {ev['file']}: eval_loss {ev['eval_loss']:.4f}, "
            f"perplexity {num(ev.get('perplexity'), '.2f')} ({doc.get('total_evals')} evals)"
        )
    g = doc.get("gradient_guard")
    if g:
        summary.grad_guard = (
            f"{g['workers']} workers, {g['dropped_shards']} dropped shards, {g['skipped_steps']} skipped steps"
        )
    kept = doc.get("checkpoints")
    if kept and kept.get("steps"):
        summary.checkpoints = (
            f"{len(kept['steps'])} kept (steps {', '.join(map(str, kept['steps']))}), "
            f"{size(kept['bytes'])} in all, {size(kept['latest_bytes'])} the latest"
        )
    disk = doc.get("disk")
    if disk:
        summary.disk = f"{disk['needed_bytes']:,} bytes needed in {disk['path']}, {disk['free_bytes']:,} free"
    f = doc.get("forgetting")
    if f:
        summary.forgetting = (  # backward transfer is -mean (docs/evaluation.md); --json has it
            f"mean {f['mean']:+.3f} nats over {counted(f['slices'], 'slice')}, "
            f"max {f['max']:+.3f} on {f['worst_slice']}"
        )
    t = doc.get("forward_transfer")
    if t and t.get("before_loss") is not None:
        mean = "" if t.get("mean") is None else f" (mean {t['mean']:+.3f}, {counted(t['files'], 'file')})"
        summary.forward_transfer = (  # on the "transfer" line: "forward" is the file's forward transfer
            f"own slice {t['before_loss']:.3f} -> {t['after_loss']:.3f} nats, learned {t['learned']:+.3f}, "
            f"forward {t['forward_transfer']:+.3f}{mean}"
        )
    err = doc.get("last_error")
    if err:
        summary.last_error = f"{err.get('file')}: {err.get('message')} ({err.get('at')})"
    return summary


def format_summary(
    doc: dict[str, Any], snapshot: Path | None = None, history: list[dict[str, Any]] | None = None
) -> str:
    """The text of ``python -m daemon status``: :func:`summarize`'s strings, one labelled line each.

    Args:
        doc: the status document.
        snapshot: the latest evolution snapshot folder, if any.
        history: ``history.jsonl`` rows; the last five are listed.
    """
    s = summarize(doc)
    lines = [
        f"state        {s.state} (pid {s.pid}, updated {s.updated_at})",
        f"global_step  {s.global_step} of max_steps {s.max_steps}",
    ]
    cur = s.current_file
    if cur and cur.steps:
        lines.append(f"current file {cur.name}: step {cur.steps} ({cur.percent}), eta {cur.eta}, {cur.size}")
    elif cur:
        lines.append(f"current file {cur.name} (preparing)")
    lines.append(f"metrics      {s.metrics}")
    optional = [("last eval", s.last_eval), ("files", s.files), ("queue", ", ".join(s.queue) or None)]
    optional += [("grad guard", s.grad_guard), ("checkpoints", s.checkpoints), ("disk", s.disk)]
    optional += [("forgetting", s.forgetting), ("transfer", s.forward_transfer), ("last error", s.last_error or "none")]
    lines += [f"{label:<12} {text}" for label, text in optional if text]
    if snapshot is not None:
        lines.append(f"snapshot     {snapshot}")
    for row in (history or [])[-5:]:
        if row["outcome"] == "done":
            lines.append(
                f"  done   {row['file']}: steps {row['start_step']} -> {row['end_step']}, "
                f"train_loss {num(row['train_loss'], '.3f')}, eval_loss {num(row['eval_loss'], '.3f')}, "
                f"{duration(row['wall_seconds'])}"
            )
        else:  # failed, or rolled_back (its error says to which step)
            lines.append(f"  {row['outcome']} {row['file']}: {row['error']}")
    return "\n".join(lines)
