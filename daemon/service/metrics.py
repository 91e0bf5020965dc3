"""Prometheus metrics of the daemon (``--metrics_port``, docs/metrics.md), read from the status at scrape time.

:class:`StatusCollector` is a ``prometheus_client`` custom collector: every scrape reads
``status/training_status.json`` (the document ``python -m daemon status`` shows, written by the
daemon and its training process) and counts rollbacks in ``status/history.jsonl``, so a value is
never older than the status file and the daemon keeps no second copy of it. :func:`serve_metrics`
serves it, with the daemon process's own ``process_*`` metrics, from ``prometheus_client``'s HTTP
server in a thread of the daemon; :meth:`MetricsServer.close` stops it and joins the thread.

Metric names start with ``continual_``; losses are in nats, times in seconds. A figure the status
does not know yet (no tokens per second before the first logging step, no regression before the
gate ran) is left out of the scrape rather than reported as 0.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from daemon.exceptions import ConfigError
from daemon.store.files import read_json_lines
from daemon.store.records import Outcome, RunState, parse_utc
from daemon.store.status import HISTORY_FILE, StatusFile

logger = logging.getLogger(__name__)

PREFIX = "continual_"
FILE_OUTCOMES = ("done", "failed", "queued", "rolled_back")
GUARD_COUNTS = {
    "workers": "Gradient-accumulation worker threads of the training process (0: the Trainer's own loop).",
    "dropped_shards": "Shards whose gradient was not finite and was left out of their step, this training process.",
    "skipped_steps": "Optimizer steps skipped for want of any finite shard, this training process.",
}


class StatusCollector:
    """A ``prometheus_client`` collector of the status folder ``status_dir`` (module docstring).

    Args:
        status_dir: the daemon's status folder.
        notifications: returns the webhook delivery counts (``delivered``, ``undelivered``, ``dropped``),
            or None when the daemon has no ``--notify_url``.
    """

    def __init__(self, status_dir: str | Path, notifications: Callable[[], dict[str, int]] | None = None) -> None:
        self.status = StatusFile(status_dir)
        self.notifications = notifications
        self._history_key: tuple[int, int] | None = None  # (size, mtime_ns) of the history last counted
        self._rollbacks = {"hand": 0, "quality_gate": 0}

    def collect(self) -> Iterator[Metric]:
        """The metrics of the status as it is now (called by ``prometheus_client`` on every scrape)."""
        doc = self.status.read()
        for name, (help_text, value) in _gauges(doc, time.time()).items():
            if isinstance(value, int | float) and not isinstance(value, bool):  # None: not known yet
                yield GaugeMetricFamily(PREFIX + name, help_text, value=float(value))
        yield _labelled(
            GaugeMetricFamily,
            "state",
            "1 for the daemon's current state, 0 for the others.",
            "state",
            {state.value: float(doc.get("state") == state.value) for state in RunState},
        )
        files = doc.get("files") or {}
        yield _labelled(
            GaugeMetricFamily,
            "files",
            "Files by outcome: done, failed, queued, rolled back.",
            "outcome",
            {outcome: files.get(outcome) or 0 for outcome in FILE_OUTCOMES},
        )
        yield _labelled(
            CounterMetricFamily,
            "rollbacks",
            "Files rolled back, by the quality gate or by hand (python -m daemon rollback).",
            "by",
            self._count_rollbacks(),
        )
        if self.notifications is not None:
            yield _labelled(
                CounterMetricFamily,
                "notifications",
                "Webhook deliveries (one per event and URL) by result.",
                "result",
                self.notifications(),
            )

    def describe(self) -> list[Metric]:
        """Nothing: the registry then never collects at registration (the names vary with what the status knows)."""
        return []

    def _count_rollbacks(self) -> dict[str, int]:
        """Rolled-back files in ``history.jsonl`` by ``hand`` and by the ``quality_gate`` (re-read when it changed)."""
        path = self.status.dir / HISTORY_FILE
        try:
            stat = path.stat()
        except FileNotFoundError:
            return dict(self._rollbacks)
        if (stat.st_size, stat.st_mtime_ns) != self._history_key:
            counts = {"hand": 0, "quality_gate": 0}
            for row in read_json_lines(path, warn=False):
                if row.get("outcome") == Outcome.ROLLED_BACK:
                    counts["hand"] += 1
                elif (
                    row.get("outcome") == Outcome.FAILED and (row.get("quality_gate") or {}).get("action") == "rollback"
                ):
                    counts["quality_gate"] += 1
            self._rollbacks, self._history_key = counts, (stat.st_size, stat.st_mtime_ns)
        return dict(self._rollbacks)


class MetricsServer:
    """``/metrics`` of a status folder served in a thread of this process (:func:`serve_metrics` starts one).

    Attributes:
        host: the address it listens on.
        port: the port it listens on (the one picked, for ``--metrics_port 0``).
    """

    def __init__(self, server: Any, thread: threading.Thread, host: str) -> None:
        self._server, self._thread = server, thread
        self.host, self.port = host, int(server.server_port)

    @property
    def url(self) -> str:
        """``http://host:port/metrics`` (an IPv6 address in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving, close the socket and join the thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def serve_metrics(
    status_dir: str | Path, host: str, port: int, notifications: Callable[[], dict[str, int]] | None = None
) -> MetricsServer:
    """Serve :class:`StatusCollector` and the process's own metrics at ``http://host:port/metrics``.

    Args:
        status_dir: the status folder read at each scrape.
        host: ``--metrics_host``.
        port: ``--metrics_port``; 0 picks a free one (:attr:`MetricsServer.port`).
        notifications: the notifier's delivery counts, if any.

    Raises:
        ConfigError: the address cannot be listened on (taken, not this machine's, no permission).
    """
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(StatusCollector(status_dir, notifications))
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise ConfigError(f"--metrics_host {host} --metrics_port {port}: cannot listen there: {e.strerror or e}") from e
    metrics = MetricsServer(server, thread, host)
    logger.info("Prometheus metrics at %s", metrics.url)
    return metrics


def _gauges(doc: dict[str, Any], now: float) -> dict[str, tuple[str, Any]]:
    """The one-sample gauges of status document ``doc`` at time ``now``: ``{name: (help, value or None)}``."""
    metrics, current = doc.get("metrics") or {}, doc.get("current_file") or {}
    gate, guard = doc.get("quality_gate") or {}, doc.get("gradient_guard") or {}
    gauges = {
        "global_step": ("Optimizer steps in the running model (global_step).", doc.get("global_step")),
        "tokens_per_second": (
            "Training tokens per second of the file in training (the last file's while idle).",
            metrics.get("tokens_per_second"),
        ),
        "training_loss": (
            "Training loss at the last logging step, the last file's while idle (nats).",
            metrics.get("loss"),
        ),
        "current_file_progress": (
            "Share of the planned steps of the file in training done (0 to 1).",
            current.get("progress"),
        ),
        "heartbeat_age_seconds": (
            "Seconds since the training process last marked progress (the stamp stall detection watches).",
            _age(now, doc.get("progress_at")),
        ),
        "status_age_seconds": (
            "Seconds since training_status.json was last written.",
            _age(now, parse_utc(doc.get("updated_at"))),
        ),
        "last_regression_nats": (
            "The quality gate's last regression: the mean loss rise on earlier slices after the latest file (nats).",
            gate.get("regression"),
        ),
        "max_regression_nats": ("--max_regression of the last quality gate (nats).", gate.get("max_regression")),
    }
    for name, help_text in GUARD_COUNTS.items():
        gauges[f"gradient_guard_{name}"] = (help_text, guard.get(name) or 0)
    return gauges


def _labelled(kind: type[Any], name: str, help_text: str, label: str, values: Mapping[str, float]) -> Metric:
    """A ``continual_<name>`` family of ``kind`` (gauge or counter) with one sample per ``label`` value."""
    family = kind(PREFIX + name, help_text, labels=[label])
    for value, number in values.items():
        family.add_metric([value], number)
    return family


def _age(now: float, stamp: Any) -> float | None:
    """Seconds from ``stamp`` (``time.time()`` seconds) to ``now``, never below 0; None without a stamp."""
    return None if not isinstance(stamp, int | float) else max(0.0, now - stamp)
