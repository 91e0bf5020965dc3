"""Processes by id: whether one is still running. Standard library only (the daemon, its training child and the
server all use it)."""

from __future__ import annotations

import os


def running(pid: int) -> bool:
    """Whether a process ``pid`` exists now (``kill(pid, 0)``), another user's included.

    A process id can be reused once its process is gone: True means some process has that id.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True
