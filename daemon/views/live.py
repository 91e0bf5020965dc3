"""``python -m daemon status --watch``: a live terminal view of the status file (rich).

:func:`render` turns one status document into a rich renderable at most 80 columns wide:
the state, the current file's progress bar with its ETA, loss and tokens/s, the queue and
the last error. :func:`watch` redraws it every second (``rich.live.Live``) until Ctrl-C,
which ends it with exit code 0 and no traceback. Reads the status file only: no torch.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from daemon.store.status import StatusFile

WIDTH = 80
BAR_WIDTH = 36
MAX_QUEUE_SHOWN = 5

_STATE_STYLE = {"training": "bold green", "failed": "bold red", "stalled": "bold red", "stopped": "yellow"}


def _num(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def render(doc: dict[str, Any]) -> RenderableType:
    """The live view of status document ``doc`` (fields as :func:`daemon.store.status.empty_status`), 80 columns wide.

    Returns:
        A rich ``Panel``: state and step, the current file's bar (steps done of planned,
        percent, ETA), loss / learning rate / tokens per second, file counts and the queue,
        the last error.
    """
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True, width=8)
    grid.add_column(no_wrap=True, overflow="ellipsis", max_width=WIDTH - 14)
    state = str(doc.get("state"))
    grid.add_row(
        "state",
        Text.assemble(
            (state, _STATE_STYLE.get(state, "bold")),
            f"  step {doc.get('global_step')} of {doc.get('max_steps')}  (updated {doc.get('updated_at')})",
        ),
    )
    cur = doc.get("current_file") or {}
    if cur.get("planned_steps"):
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=cur["planned_steps"], completed=cur.get("steps_done", 0), width=BAR_WIDTH),
            f"{cur.get('steps_done', 0)}/{cur['planned_steps']} {100 * cur.get('progress', 0):.0f}% "
            f"eta {_duration(cur.get('eta_seconds'))}",
        )
        grid.add_row("file", _cut(str(cur.get("name")), WIDTH - 14))
        grid.add_row("", bar)
    elif cur.get("name"):
        grid.add_row("file", _cut(f"{cur['name']} (preparing)", WIDTH - 14))
    m = doc.get("metrics") or {}
    grid.add_row(
        "loss",
        f"{_num(m.get('loss'), '.4f')}  lr {_num(m.get('learning_rate'), '.3g')}  "
        f"tokens/s {_num(m.get('tokens_per_second'), ',.0f')}",
    )
    files = doc.get("files") or {}
    grid.add_row(
        "files", f"{files.get('done', 0)} done, {files.get('failed', 0)} failed, {files.get('queued', 0)} queued"
    )
    queue = list(doc.get("queue") or [])
    if queue:
        shown = ", ".join(queue[:MAX_QUEUE_SHOWN]) + (f" +{len(queue) - MAX_QUEUE_SHOWN}" if len(queue) > 5 else "")
        grid.add_row("queue", _cut(shown, WIDTH - 14))
    err = doc.get("last_error")
    error = Text(_cut(f"{err.get('file')}: {err.get('message')}", 2 * (WIDTH - 14)), style="red") if err else "none"
    grid.add_row("error", error)
    return Panel(Group(grid), title="continual daemon", title_align="left", width=WIDTH)


def watch(status_dir: str | os.PathLike[str], interval: float = 1.0) -> int:
    """Redraw :func:`render` of ``<status_dir>/training_status.json`` every ``interval`` seconds until Ctrl-C.

    Returns:
        0 (Ctrl-C is the way out).
    """
    status = StatusFile(Path(status_dir))
    try:
        with Live(render(status.read()), auto_refresh=False, transient=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(status.read()), refresh=True)
    except KeyboardInterrupt:
        return 0
