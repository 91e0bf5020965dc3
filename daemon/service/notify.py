"""Delivery of the daemon's events as JSON POSTs (``--notify_url``), never in training's way.

:class:`Notifier` holds, for each URL, a bounded queue and a background thread of its own (so a
receiver that is down never holds up the others). :meth:`Notifier.send` only appends to the
queues (no I/O, never blocks); each thread POSTs its URL's events with ``urllib.request``, each
attempt bounded by ``--notify_timeout`` (per socket operation). A timeout, a refused connection,
an answer that is not HTTP, a 5xx, 408, 425 or 429 is retried ``--notify_retries`` times, waiting
``--notify_backoff`` seconds and twice as long before each further retry; any other 4xx is not
retried, nor is a redirect (3xx: never followed, since following it would re-send the event as
a GET without its body). Each event's outcome per URL is one line of
``status/notifications.jsonl`` (:class:`Delivery`); an undelivered one is also a warning in the
daemon's log. When a queue is full (a receiver down for long while events keep coming) its
oldest event is dropped; the URL's thread logs it and writes a ``dropped`` line.

A webhook URL often holds a secret (a token in its path, ``user:password@``): logs and
``notifications.jsonl`` name a URL only as ``scheme://host[:port]/…`` (:func:`redact`) and its
place in ``--notify_url``.

:meth:`Notifier.close` (the daemon stops) lets the threads deliver what is queued for
``max(2 * timeout, 1)`` seconds, after which what is left is recorded as undelivered; it
returns at most ``timeout`` seconds later whatever the receivers do (a POST still in flight
then, e.g. a receiver that trickles its answer or a DNS lookup that hangs, is left to its
daemonic thread, logged and recorded as undelivered).

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
from urllib.parse import urljoin

from daemon.config_ops import redact
from daemon.store.files import append_json_lines
from daemon.store.records import utc_now

logger = logging.getLogger(__name__)

NOTIFICATIONS_FILE = "notifications.jsonl"
QUEUE_SIZE = 1000  # events waiting; a full queue drops its oldest
USER_AGENT = "continual-daemon"
RETRIED_STATUSES = frozenset({408, 425, 429})  # and every 5xx
STOPPED = "the daemon stopped before it could be sent"


@dataclass
class Delivery:
    """One line of ``status/notifications.jsonl``: what became of one event at one URL.

    Attributes:
        id: the event's ``id`` (the same across its retries and its URLs).
        event: the event's type (``file_done``, ...).
        url: the receiver, redacted (:func:`redact`: ``scheme://host[:port]/…``).
        receiver: the URL's place in ``--notify_url`` (1 for the first): two URLs of one host differ here.
        result: ``delivered`` (a POST got a 2xx answer), ``undelivered`` (every attempt failed, a 3xx or
            4xx was final, or the daemon stopped first) or ``dropped`` (the queue was full).
        attempts: POSTs made (0 when the event was dropped, the daemon stopped first, or it was still in
            flight when the daemon stopped).
        status: the last HTTP status received, None when none came (timeout, refused).
        error: why the last attempt failed; None when delivered.
        at: when the outcome was known (ISO-8601 UTC).
    """

    id: str
    event: str
    url: str
    receiver: int
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


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuses every redirect: the 3xx answer reaches :meth:`_Channel.post` as an ``HTTPError``."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102 - as the base class
        return None


class Notifier:
    """POSTs queued events to each of ``urls`` from a background thread per URL (module docstring).

    Args:
        urls: the receivers (``--notify_url``).
        status_dir: where ``notifications.jsonl`` is appended.
        timeout: seconds one POST may wait for each socket operation.
        retries: further attempts after a failed first one.
        backoff: seconds before the first retry; doubled before each next one.
        queue_size: events held at most per URL; when full, the oldest is dropped.
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
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.log_path = Path(status_dir) / NOTIFICATIONS_FILE
        self.counts = {"delivered": 0, "undelivered": 0, "dropped": 0}  # per (event, URL); read by the metrics
        self._record_lock = threading.Lock()  # the threads' outcomes, and close()'s
        self.closing = threading.Event()
        self.deadline = float("inf")  # monotonic time after which what is left is undelivered
        self.channels = [_Channel(self, index, url, queue_size) for index, url in enumerate(urls, start=1)]

    def send(self, event: dict[str, Any]) -> None:
        """Queue ``event`` (a JSON-able dict with ``id`` and ``event``) for every URL; returns at once, no I/O."""
        for channel in self.channels:
            channel.put(event)

    def close(self) -> None:
        """Deliver what is queued for ``max(2 * timeout, 1)`` seconds; return at most ``timeout`` seconds later.

        A URL's thread still in a POST then is left running (it is a daemon thread): its event and
        what was queued behind it are recorded as undelivered, with a warning in the log.
        """
        self.deadline = time.monotonic() + max(2 * self.timeout, 1.0)
        self.closing.set()
        for channel in self.channels:
            channel.wake()
        end = self.deadline + self.timeout
        for channel in self.channels:
            channel.thread.join(max(0.0, end - time.monotonic()))
        for channel in self.channels:
            if channel.thread.is_alive():
                channel.abandon()

    def record(self, deliveries: list[Delivery]) -> None:
        """Count ``deliveries``, log the undelivered and dropped ones and append them all to ``notifications.jsonl``."""
        with self._record_lock:
            for d in deliveries:
                self.counts[d.result] += 1
                if d.result == "undelivered":
                    why = f"after {d.attempts} attempts: {d.error}"
                    logger.warning("event %s %s not delivered to %s (#%d) %s", d.event, d.id, d.url, d.receiver, why)
                elif d.result == "dropped":
                    logger.warning(
                        "notification queue of %s (#%d) full: dropped the oldest event %s %s",
                        d.url,
                        d.receiver,
                        d.event,
                        d.id,
                    )
            try:
                append_json_lines(self.log_path, [asdict(d) for d in deliveries])
            except OSError:
                logger.exception("could not append to %s", self.log_path)


class _Channel:
    """One URL of a :class:`Notifier`: its queue, and the thread that POSTs what is queued there."""

    def __init__(self, notifier: Notifier, index: int, url: str, queue_size: int) -> None:
        self.notifier, self.index, self.url, self.shown = notifier, index, url, redact(url)
        self.queue: collections.deque[dict[str, Any]] = collections.deque()
        self.queue_size = queue_size
        self.dropped: list[dict[str, Any]] = []  # dropped by put(), recorded by the thread (put does no I/O)
        self.current: dict[str, Any] | None = None  # the event being POSTed
        self.abandoned = False  # close() gave up on the thread: it records nothing more
        self.ready = threading.Condition()
        self.opener = urllib.request.build_opener(_NoRedirects)
        self.thread = threading.Thread(target=self.run, name=f"notifier {self.shown} #{index}", daemon=True)
        self.thread.start()

    def put(self, event: dict[str, Any]) -> None:
        """Queue ``event``; a full queue drops its oldest (recorded by the thread)."""
        with self.ready:
            if len(self.queue) >= self.queue_size:
                self.dropped.append(self.queue.popleft())
            self.queue.append(event)
            self.ready.notify()

    def wake(self) -> None:
        """Make the thread look at the queue and the deadline again (close() was called)."""
        with self.ready:
            self.ready.notify_all()

    def run(self) -> None:
        """The thread: record the dropped events, POST the queued ones; return when closing and empty."""
        while True:
            with self.ready:
                while not (self.queue or self.dropped or self.notifier.closing.is_set()):
                    self.ready.wait()
                dropped, self.dropped = self.dropped, []
                self.current = self.queue.popleft() if self.queue else None
                event = self.current
            if not dropped and event is None:
                return  # closing, and nothing left
            try:
                if dropped:
                    self.notifier.record([self.outcome(e, 0, None, "the queue was full", "dropped") for e in dropped])
                if event is not None:
                    delivery = self.deliver(event)
                    with self.ready:
                        self.current = None
                        if self.abandoned:
                            return  # close() recorded it already
                    self.notifier.record([delivery])
            except Exception:  # a bug here must not end the thread: later events still go out
                logger.exception(
                    "could not deliver event %s to %s (#%d)", (event or {}).get("id"), self.shown, self.index
                )

    def abandon(self) -> None:
        """close() gave up waiting: record the event in flight and those queued behind it as undelivered."""
        with self.ready:
            self.abandoned = True
            current = self.current
            left = [current] if current is not None else []
            left += list(self.queue)
            dropped, self.dropped = self.dropped, []
            self.queue.clear()
        logger.warning(
            "notifier: a POST to %s (#%d) is still in flight %g s after the daemon began to stop: "
            "left behind, with %d event(s) not sent",
            self.shown,
            self.index,
            max(2 * self.notifier.timeout, 1.0) + self.notifier.timeout,
            len(left),
        )
        in_flight = "still in flight when the daemon stopped"
        outcomes = [self.outcome(e, 0, None, "the queue was full", "dropped") for e in dropped]
        outcomes += [self.outcome(e, 0, None, in_flight if e is current else STOPPED) for e in left]
        self.notifier.record(outcomes)

    def deliver(self, event: dict[str, Any]) -> Delivery:
        """POST ``event`` until a 2xx, a final failure, or the close deadline."""
        notifier = self.notifier
        body = json.dumps(json_safe(event), allow_nan=False, default=str).encode()
        attempts, failure = 0, None
        while attempts <= notifier.retries:
            if attempts and not self.wait(notifier.backoff * 2 ** (attempts - 1)):
                break
            if time.monotonic() >= notifier.deadline:
                break
            attempts += 1
            try:
                status = self.post(body, event)
                return self.outcome(event, attempts, status, None)
            except _Failed as e:
                failure = e
                if not e.retry:
                    break
        return self.outcome(event, attempts, failure.status if failure else None, str(failure) if failure else STOPPED)

    def wait(self, seconds: float) -> bool:
        """Sleep ``seconds``, cut short at the close deadline; False when the deadline came first."""
        end = time.monotonic() + seconds
        with self.ready:  # close() wakes it: a wait ends at the deadline, not after the whole backoff
            while (now := time.monotonic()) < min(end, self.notifier.deadline):
                self.ready.wait(min(end, self.notifier.deadline) - now)
            return time.monotonic() < self.notifier.deadline

    def post(self, body: bytes, event: dict[str, Any]) -> int:
        """One POST; the HTTP status of a 2xx answer.

        Raises:
            _Failed: no 2xx answer (``retry`` for a timeout, a connection error, an answer that is not
                HTTP, 408, 425, 429, 5xx; not for a redirect, another 4xx or a URL urllib cannot use).
        """
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Continual-Event": str(event.get("event")),
            "X-Continual-Event-Id": str(event.get("id")),
        }
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self.opener.open(request, timeout=self.notifier.timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as e:  # a non-2xx answer
            location = e.headers.get("Location") if e.headers is not None else None
            e.close()
            if 300 <= e.code < 400:
                where = redact(urljoin(self.url, location)) if location else "no Location"
                raise _Failed(f"HTTP {e.code}: redirected to {where}: use that URL", e.code, False) from e
            raise _Failed(f"HTTP {e.code} {e.reason}", e.code, e.code >= 500 or e.code in RETRIED_STATUSES) from e
        except (ValueError, http.client.InvalidURL) as e:  # a URL urllib cannot use; its message would quote the URL
            raise _Failed(f"{type(e).__name__}: not a URL that can be POSTed to", None, False) from e
        except (OSError, http.client.HTTPException) as e:  # URLError, timeout, reset, an answer that is not HTTP
            reason = getattr(e, "reason", None) or e
            raise _Failed(f"{type(reason).__name__}: {reason}", None, True) from e

    def outcome(
        self, event: dict[str, Any], attempts: int, status: int | None, error: str | None, result: str = ""
    ) -> Delivery:
        """The :class:`Delivery` of ``event`` at this URL."""
        result = result or ("delivered" if error is None else "undelivered")
        event_id, kind = str(event["id"]), str(event["event"])
        return Delivery(event_id, kind, self.shown, self.index, result, attempts, status, error, utc_now())


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None: a loss can be NaN, and JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value
