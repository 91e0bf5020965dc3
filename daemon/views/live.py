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
from daemon.views.summary import summarize

WIDTH = 80
BAR_WIDTH = 36
MAX_QUEUE_SHOWN = 5

_STATE_STYLE = {"training": "bold green", "failed": "bold red", "stalled": "bold red", "stopped": "yellow"}


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def render(doc: dict[str, Any]) -> RenderableType:
    """The live view of status document ``doc`` (fields as :func:`daemon.store.status.empty_status`), 80 columns wide.

    Returns:
        A rich ``Panel``: state and step, the current file's bar (steps done of planned,
        percent, ETA), loss / learning rate / tokens per second, file counts and the queue,
        the last error.
    """
    s = summarize(doc)
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True, width=8)
    grid.add_column(no_wrap=True, overflow="ellipsis", max_width=WIDTH - 14)
    grid.add_row(
        "state",
        Text.assemble(
            (s.state, _STATE_STYLE.get(s.state, "bold")),
            f"  step {s.global_step} of {s.max_steps}  (updated {s.updated_at})",
        ),
    )
    cur = doc.get("current_file") or {}
    if s.current_file and s.current_file.steps:
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=cur["planned_steps"], completed=cur.get("steps_done", 0), width=BAR_WIDTH),
            f"{s.current_file.steps} {s.current_file.percent} eta {s.current_file.eta}",
        )
        grid.add_row("file", _cut(s.current_file.name, WIDTH - 14))
        grid.add_row("", bar)
    elif s.current_file:
        grid.add_row("file", _cut(f"{s.current_file.name} (preparing)", WIDTH - 14))
    grid.add_row("metrics", _cut(s.metrics, WIDTH - 14))
    grid.add_row("files", s.files)
    if s.queue:
        more = f" +{len(s.queue) - MAX_QUEUE_SHOWN}" if len(s.queue) > MAX_QUEUE_SHOWN else ""
        grid.add_row("queue", _cut(", ".join(s.queue[:MAX_QUEUE_SHOWN]) + more, WIDTH - 14))
    error = Text(_cut(s.last_error, 2 * (WIDTH - 14)), style="red") if s.last_error else "none"
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
