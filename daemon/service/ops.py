"""The daemon among the tools that watch it: its webhooks and its ``/metrics``, for as long as it runs.

:func:`watched` wraps a :class:`~daemon.service.watcher.Daemon`'s run (``python -m daemon``,
:func:`daemon.service.cli.main`): it starts the notifier (:mod:`daemon.service.notify`) and the
Prometheus endpoint (:mod:`daemon.service.metrics`) before the loop, sends ``daemon_started``, and
on the way out (a drained inbox, a stop signal, an error) a last look at the history, then
``daemon_stopped``, then stops both and joins their threads (a webhook POST still in flight past
:meth:`~daemon.service.notify.Notifier.close`'s bound is left behind, logged).

The loop itself is not changed (bar one hook): its supervisor is wrapped in a :class:`NotifyingSupervisor`,
which looks for new ``history.jsonl`` rows (:meth:`daemon.service.events.Events.poll`) at the
points where the daemon learns of them (each poll of a running training process, its end, a file
filed away, each idle turn of the loop). ``stalled`` is sent from where the daemon counts a
stalled attempt (its ``on_stall``, :func:`daemon.service.attempts.count_attempt`). None of it
blocks: events go to the notifier's queues.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

from daemon.config_ops import OpsArguments
from daemon.names import printable
from daemon.service.events import Events, forget_cursor
from daemon.service.metrics import MetricsServer, serve_metrics
from daemon.service.notify import Notifier
from daemon.service.supervisor import ChildResult, Supervisor
from daemon.service.watcher import Daemon
from daemon.store.ledger import LedgerRow

logger = logging.getLogger(__name__)


class NotifyingSupervisor:
    """A :class:`~daemon.service.supervisor.Supervisor` that tells ``events`` what it sees, then does as ``inner``.

    Args:
        inner: the supervisor that runs the training processes.
        events: where the events go.
    """

    def __init__(self, inner: Supervisor, events: Events) -> None:
        self.inner, self.events = inner, events

    def run(
        self, train_args: list[str], stop: threading.Event, on_poll: Callable[[], None] | None = None
    ) -> ChildResult:
        """As :meth:`ProcessSupervisor.run`, announcing history rows as they appear."""

        def poll() -> None:
            self.events.poll()
            if on_poll is not None:
                on_poll()

        result = self.inner.run(train_args, stop, poll)
        self.events.poll()
        return result

    def start_spare(self, line_argv: list[str] | None = None) -> None:
        """Each idle turn of the loop: announce new history rows, then as ``inner``."""
        self.events.poll()
        self.inner.start_spare(line_argv)

    def stop_spare(self) -> None:
        """As ``inner``."""
        self.inner.stop_spare()

    def refresh_report(self) -> None:
        """A file was filed away: announce its history row, then as ``inner``."""
        self.events.poll()
        self.inner.refresh_report()

    def wait_report(self) -> None:
        """As ``inner``."""
        self.inner.wait_report()

    def kill_all(self) -> None:
        """As ``inner``."""
        self.inner.kill_all()


@contextlib.contextmanager
def watched(daemon: Daemon, ops: OpsArguments) -> Iterator[MetricsServer | None]:
    """Give ``daemon`` its webhooks and metrics endpoint (``ops``) for the block: ``with watched(d, ops): d.run()``.

    Yields:
        The metrics server (its :attr:`~MetricsServer.port`), or None without ``--metrics_port``.

    Raises:
        ConfigError: the metrics endpoint cannot listen at ``--metrics_host``/``--metrics_port``
            (raised before the block; nothing is left running).
    """
    args = daemon.args
    notifier: Notifier | None = None
    events: Events | None = None
    metrics: MetricsServer | None = None
    try:
        if ops.notify_url:
            notifier = Notifier(
                ops.notify_url,
                args.status_dir,
                timeout=ops.notify_timeout,
                retries=ops.notify_retries,
                backoff=ops.notify_backoff,
            )
            events = Events(notifier.send, args.status_dir, args.output_dir)
            daemon.supervisor = NotifyingSupervisor(daemon.supervisor, events)
            daemon.on_stall = _stall_announcer(events, args.max_attempts, args.stall_timeout)
        else:  # what this run trains is not replayed when webhooks are turned on again
            forget_cursor(args.status_dir)
        if ops.metrics_port is not None:
            counts = (lambda: dict(notifier.counts)) if notifier else None
            metrics = serve_metrics(args.status_dir, ops.metrics_host, ops.metrics_port, counts)
            if ops.metrics_exposed:
                logger.info(
                    "metrics listen on %s: other machines can scrape them (no authentication)", ops.metrics_host
                )
        if events is not None:
            events.started()
        reason = "stopped"
        try:
            yield metrics
            reason = _why_stopped(daemon)
        except BaseException as e:
            reason = f"error: {type(e).__name__}: {e}"
            raise
        finally:
            if events is not None:
                events.poll()  # the rows of the last file
                events.stopped(reason)
    finally:
        if notifier is not None:
            notifier.close()
        if metrics is not None:
            metrics.close()


def _stall_announcer(events: Events, max_attempts: int, stall_timeout: float) -> Callable[[LedgerRow], None]:
    """The daemon's ``on_stall``: a ``stalled`` event for the ledger row of a stalled attempt (counted)."""

    def announce(entry: LedgerRow) -> None:
        events.stalled(printable(entry.name), entry.attempts, max_attempts, stall_timeout)

    return announce


def _why_stopped(daemon: Daemon) -> str:
    """Why ``daemon.run()`` returned: a stop signal, ``--max_files``, or a drained inbox (``--once``)."""
    if daemon.stop.is_set():
        return "a stop signal (SIGINT or SIGTERM)"
    if daemon.args.max_files is not None and daemon.processed >= daemon.args.max_files:
        return f"--max_files {daemon.args.max_files} reached"
    return "inbox drained (--once)"
