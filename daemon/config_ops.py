"""The daemon's options for the tools that watch it: JSON webhooks and a Prometheus endpoint.

Parsed with :class:`daemon.config.DaemonArguments` by ``HfArgumentParser``
(:func:`daemon.service.cli.parse_daemon_args`, which names every invalid option of both in one
message); like them, a config file's keys of these names
are the daemon's and never reach a training process. Standard library only.
docs/notifications.md and docs/metrics.md describe what they turn on.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from daemon.exceptions import ConfigError

MAX_NOTIFY_SECONDS = 3600.0  # a bound on --notify_timeout and --notify_backoff: an hour; inf would overflow time_t
# What http.client refuses in a request's target (its _contains_disallowed_url_pchar_re): its error quotes the path
DISALLOWED_URL_CHARS = re.compile("[\x00-\x20\x7f]")


@dataclass
class OpsArguments:
    """Webhooks (``--notify_url``, :mod:`daemon.service.notify`) and metrics (``--metrics_port``)."""

    notify_url: list[str] = field(
        default_factory=list,
        metadata={
            "help": "POST a JSON event (file done, failed, rolled back, reopened, quality-gate warning, stall, "
            "daemon start and stop) to this http(s) URL; repeat the flag, or give several URLs, for more receivers "
            "(docs/notifications.md). Delivery never waits training.",
            "action": "extend",  # --notify_url A --notify_url B gives both (argparse's default keeps the last)
        },
    )
    notify_timeout: float = field(
        default=5.0,
        metadata={
            "help": "Seconds a POST waits for the receiver (to connect, then for each read) before it fails "
            "(at most 3600)."
        },
    )
    notify_retries: int = field(
        default=3,
        metadata={
            "help": "Retries of a failed POST (a timeout, a refused connection, an answer that is not HTTP, "
            "a 5xx, 408, 425 or 429; never a redirect or another 4xx)."
        },
    )
    notify_backoff: float = field(
        default=1.0,
        metadata={
            "help": "Seconds before the first retry of a POST; each further retry waits twice as long (at most 3600)."
        },
    )
    metrics_port: int | None = field(
        default=None,
        metadata={
            "help": "Serve Prometheus metrics at http://--metrics_host:PORT/metrics from the daemon "
            "(docs/metrics.md); 0 picks a free port and logs it. Default: off."
        },
    )
    metrics_host: str = field(
        default="127.0.0.1",
        metadata={"help": "Address the metrics endpoint listens on: loopback by default; 0.0.0.0 for every interface."},
    )

    def __post_init__(self) -> None:
        problems = [f"--notify_url {redact(url)}: {why}" for url in self.notify_url if (why := url_problem(url))]
        if not 0 < self.notify_timeout <= MAX_NOTIFY_SECONDS:
            problems.append(f"--notify_timeout must be > 0 and at most {MAX_NOTIFY_SECONDS:g} seconds")
        if self.notify_retries < 0:
            problems.append("--notify_retries must be >= 0")
        if not 0 <= self.notify_backoff <= MAX_NOTIFY_SECONDS:
            problems.append(f"--notify_backoff must be >= 0 and at most {MAX_NOTIFY_SECONDS:g} seconds")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            problems.append("--metrics_port must be a port number (0 to 65535)")
        if not self.metrics_host.strip():
            problems.append("--metrics_host must be an address")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def metrics_exposed(self) -> bool:
        """True when ``--metrics_host`` is not a loopback address (other machines can scrape it)."""
        try:
            return not ipaddress.ip_address(self.metrics_host).is_loopback
        except ValueError:  # a host name
            return self.metrics_host != "localhost"


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot receive a webhook POST (one phrase that never quotes it), or None when it can."""
    if DISALLOWED_URL_CHARS.search(url):
        return "holds a space or a control character (percent-encode it: %20)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as e:
        return str(e)
    if parts.scheme not in ("http", "https"):
        return "not an http:// or https:// URL"
    if not parts.hostname:
        return "no host"
    return None


def redact(url: str) -> str:
    """``url`` without what may be a secret: ``scheme://host[:port]/…`` (no user, password, path or query);
    ``<a URL that does not parse>`` where urllib cannot split it (an unclosed ``[`` of an IPv6 host)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a URL that does not parse>"
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{f':{port}' if port is not None else ''}/…"
