"""How a training process stops: the first SIGINT/SIGTERM checkpoints and stops, a second exits.

The run (:mod:`daemon.training.run`) trains inside :func:`stop_on_signals`;
:class:`~daemon.training.callbacks.PlanCallback` turns the request into a checkpoint at the next optimizer
step (on every process at once).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)


@contextmanager
def stop_on_signals(stop_requested: threading.Event) -> Iterator[None]:
    """During setup and fit, the first SIGINT/SIGTERM sets ``stop_requested`` (checkpoint, then stop).

    A second one exits at once. Outside the main thread (signals cannot be handled there)
    this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop_requested.is_set():
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        logger.warning("%s: saving a checkpoint at the next step, then stopping", signal.Signals(signum).name)
        stop_requested.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
