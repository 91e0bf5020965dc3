"""A real daemon with ``--notify_url`` and ``--metrics_port``: one file trained, announced and scraped.

The daemon and its training process run as ``python -m daemon`` does, on the tiny model; a local
HTTP server records the webhooks, and ``/metrics`` is scraped while the daemon idles after the file.
"""

from __future__ import annotations

import re
import signal

from helpers import start_daemon, stdlib_documents, wait_for, write_jsonl
from test_metrics import one, scrape
from test_notify import EVENT_FIELDS, Receiver

from daemon.service.notify import NOTIFICATIONS_FILE
from daemon.store.files import read_json_lines
from daemon.store.status import StatusFile


def test_a_daemon_announces_its_file_and_serves_metrics_that_match_its_status(tree):
    receiver = Receiver()
    try:
        daemon = start_daemon(tree, "--notify_url", receiver.url, "--metrics_port", "0", "--prestart", "False")
        try:
            log = tree.root / "daemon.log"
            url = wait_for(
                lambda: re.search(r"Prometheus metrics at (\S+)", log.read_text()), timeout=120, what="the endpoint"
            ).group(1)
            write_jsonl(tree.inbox / ".a.jsonl.part", [{"text": d} for d in stdlib_documents(limit=12)])
            (tree.inbox / ".a.jsonl.part").rename(tree.inbox / "a.jsonl")
            wait_for(lambda: "file_done" in [e["event"] for e in receiver.events()], timeout=240, what="file_done")
            wait_for(lambda: StatusFile(tree.status).read()["state"] == "idle", timeout=60, what="the daemon to idle")
            # The receiver sees file_done before the notifier, back from its POST, records it as delivered.
            wait_for(lambda: len(delivered(tree)) == 2, timeout=60, what="daemon_started and file_done recorded")
            doc, samples = StatusFile(tree.status).read(), scrape(url)
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=60) == 0
    finally:
        receiver.close()
    (row,) = tree.history()
    assert one(samples, "continual_global_step") == doc["global_step"] == row["end_step"] > 0
    assert one(samples, "continual_files", outcome="done") == doc["files"]["done"] == 1
    assert one(samples, "continual_state", state="idle") == 1
    assert one(samples, "continual_notifications_total", result="delivered") == 2  # started, file_done
    events = receiver.events()
    assert [e["event"] for e in events] == ["daemon_started", "file_done", "daemon_stopped"]
    assert all(EVENT_FIELDS <= set(e) for e in events)
    assert events[1]["history_row"] == row and events[1]["file"] == "a.jsonl"
    assert events[2]["reason"] == "a stop signal (SIGINT or SIGTERM)"


def delivered(tree) -> list[dict]:
    """The ``delivered`` lines of ``status/notifications.jsonl``."""
    return [d for d in read_json_lines(tree.status / NOTIFICATIONS_FILE) if d["result"] == "delivered"]
