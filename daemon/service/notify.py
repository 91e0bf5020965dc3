"""Delivery of the daemon's events as JSON POSTs (``--notify_url``), never in training's way.

:class:`Notifier` holds a bounded queue and ONE background thread. :meth:`Notifier.send` only
appends to the queue (no I/O, never blocks); the thread POSTs each event to every URL with
``urllib.request``, each attempt bounded by ``--notify_timeout``. A timeout, a refused
connection, a 5xx or a 429 is retried ``--notify_retries`` times, waiting ``--notify_backoff``
seconds and twice as long before each further retry; any other 4xx is not retried. Each
event's outcome per URL is one line of ``status/notifications.jsonl``
(:class:`Delivery`); an undelivered one is also a warning in the daemon's log. When the queue
is full (a receiver down for long while events keep coming) the oldest event is dropped,
with a log line and a ``dropped`` line.

:meth:`Notifier.close` (the daemon stops) lets the thread deliver what is queued for at most
``max(2 * timeout, 1)`` seconds, then records the rest as undelivered and joins it.

The events themselves and their schema are :mod:`daemon.service.events` (docs/notifications.md).
Standard library only.
"""

from __future__ import annotations

import collections
import http.client
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from daemon.store.files import append_json_lines
from daemon.store.records import utc_now

logger = logging.getLogger(__name__)

NOTIFICATIONS_FILE = "notifications.jsonl"
QUEUE_SIZE = 1000  # events waiting; a full queue drops its oldest
USER_AGENT = "continual-daemon"
RETRIED_STATUSES = frozenset({408, 425, 429})  # and every 5xx


@dataclass
class Delivery:
    """One line of ``status/notifications.jsonl``: what became of one event at one URL.

    Attributes:
        id: the event's ``id`` (the same across its retries and its URLs).
        event: the event's type (``file_done``, ...).
        url: the receiver.
        result: ``delivered`` (a POST got a 2xx answer), ``undelivered`` (every attempt failed, a 4xx
            was final, or the daemon stopped first) or ``dropped`` (the queue was full).
        attempts: POSTs made (0 when the event was dropped or the daemon stopped first).
        status: the last HTTP status received, None when none came (timeout, refused).
        error: why the last attempt failed; None when delivered.
        at: when the outcome was known (ISO-8601 UTC).
    """

    id: str
    event: str
    url: str
    result: str
    attempts: int
    status: int | None
    error: str | None
    at: str


class _Failed(Exception):
    """One POST that did not get a 2xx answer; ``retry`` says whether another attempt may."""

    def __init__(self, message: str, status: int | None, retry: bool) -> None:
        super().__init__(message)
        self.status, self.retry = status, retry


class Notifier:
    """POSTs queued events to ``urls`` from one background thread (module docstring).

    Args:
        urls: the receivers (``--notify_url``).
        status_dir: where ``notifications.jsonl`` is appended.
        timeout: seconds one POST may take.
        retries: further attempts after a failed first one.
        backoff: seconds before the first retry; doubled before each next one.
        queue_size: events held at most; when full, the oldest is dropped.
    """

    def __init__(
        self,
        urls: list[str],
        status_dir: str | Path,
        *,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 1.0,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.urls, self.timeout, self.retries, self.backoff = list(urls), timeout, retries, backoff
        self.log_path = Path(status_dir) / NOTIFICATIONS_FILE
        self.counts = {"delivered": 0, "undelivered": 0, "dropped": 0}  # per (event, URL); read by the metrics
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._queue_size = queue_size
        self._record_lock = threading.Lock()  # the thread's outcomes and send()'s dropped events
        self._ready = threading.Condition()
        self._closing = threading.Event()
        self._deadline = float("inf")  # monotonic time after which close() gives up on what is left
        self._thread = threading.Thread(target=self._run, name="notifier", daemon=True)
        self._thread.start()

    def send(self, event: dict[str, Any]) -> None:
        """Queue ``event`` (a JSON-able dict with ``id`` and ``event``) for every URL; returns at once."""
        dropped = None
        with self._ready:
            if len(self._queue) >= self._queue_size:
                dropped = self._queue.popleft()
            self._queue.append(event)
            self._ready.notify()
        if dropped is not None:
            logger.warning("notification queue full: dropped the oldest event %s %s", dropped["event"], dropped["id"])
            self._record([self._outcome(dropped, url, 0, None, "the queue was full", "dropped") for url in self.urls])

    def close(self) -> None:
        """Deliver what is queued for at most ``max(2 * timeout, 1)`` seconds, then stop the thread and join it."""
        with self._ready:
            self._deadline = time.monotonic() + max(2 * self.timeout, 1.0)
            self._closing.set()
            self._ready.notify()
        self._thread.join()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closing.is_set():
                    self._ready.wait()
                if not self._queue:
                    return  # closing, and nothing left
                event = self._queue.popleft()
            try:
                self._record([self._deliver(event, url) for url in self.urls])
            except Exception:  # a bug here must not end the thread: later events still go out
                logger.exception("could not deliver event %s", event.get("id"))

    def _deliver(self, event: dict[str, Any], url: str) -> Delivery:
        """POST ``event`` to ``url`` until a 2xx, a final failure, or the close deadline."""
        body = json.dumps(json_safe(event), allow_nan=False, default=str).encode()
        attempts, failure = 0, None
        while attempts <= self.retries:
            if attempts and not self._wait(self.backoff * 2 ** (attempts - 1)):
                break
            if time.monotonic() >= self._deadline:
                break
            attempts += 1
            try:
                status = self._post(url, body, event)
                return self._outcome(event, url, attempts, status, None)
            except _Failed as e:
                failure = e
                if not e.retry:
                    break
        error = str(failure) if failure else "the daemon stopped before it could be sent"
        return self._outcome(event, url, attempts, failure.status if failure else None, error)

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds``, cut short at the close deadline; False when the deadline came first."""
        end = time.monotonic() + seconds
        with self._ready:  # close() notifies it: a wait ends at the deadline, not after the whole backoff
            while (now := time.monotonic()) < min(end, self._deadline):
                self._ready.wait(min(end, self._deadline) - now)
            return time.monotonic() < self._deadline

    def _post(self, url: str, body: bytes, event: dict[str, Any]) -> int:
        """One POST; the HTTP status of a 2xx answer.

        Raises:
            _Failed: no 2xx answer (``retry`` for a timeout, a connection error, 408, 425, 429, 5xx).
        """
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Continual-Event": str(event.get("event")),
            "X-Continual-Event-Id": str(event.get("id")),
        }
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - http(s) only
                return int(response.status)
        except urllib.error.HTTPError as e:  # a non-2xx answer
            e.close()
            raise _Failed(f"HTTP {e.code} {e.reason}", e.code, e.code >= 500 or e.code in RETRIED_STATUSES) from e
        except (OSError, http.client.HTTPException, ValueError) as e:  # URLError, timeout, reset, garbage; bad URL
            reason = getattr(e, "reason", None) or e
            raise _Failed(f"{type(reason).__name__}: {reason}", None, not isinstance(e, ValueError)) from e

    def _outcome(
        self, event: dict[str, Any], url: str, attempts: int, status: int | None, error: str | None, result: str = ""
    ) -> Delivery:
        result = result or ("delivered" if error is None else "undelivered")
        return Delivery(str(event["id"]), str(event["event"]), url, result, attempts, status, error, utc_now())

    def _record(self, deliveries: list[Delivery]) -> None:
        """Count ``deliveries``, log the undelivered ones and append them all to ``notifications.jsonl``."""
        with self._record_lock:
            for d in deliveries:
                self.counts[d.result] += 1
                if d.result == "undelivered":
                    why = f"after {d.attempts} attempts: {d.error}"
                    logger.warning("event %s %s not delivered to %s %s", d.event, d.id, d.url, why)
            try:
                append_json_lines(self.log_path, [asdict(d) for d in deliveries])
            except OSError:
                logger.exception("could not append to %s", self.log_path)


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None: a loss can be NaN, and JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value
