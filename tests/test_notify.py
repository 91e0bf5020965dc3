"""Webhooks (``--notify_url``): the events of the history and of the daemon, delivered to real local HTTP servers.

Receivers are ``http.server`` servers started in the test: one that records, one that never
answers until the test lets it, one that trickles an answer that never ends, one that answers an
error status or a redirect, and a closed port. The daemon
runs in this process with the fake training process of ``test_watcher`` (milliseconds per file).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import Tree, wait_for, write_jsonl
from test_watcher import FakeTraining, _daemon, _drop

from daemon.config_ops import OpsArguments, redact
from daemon.exceptions import ConfigError
from daemon.service.cli import parse_daemon_args
from daemon.service.events import EVENT_TYPES, Events
from daemon.service.notify import NOTIFICATIONS_FILE, STOPPED, Notifier
from daemon.service.ops import watched
from daemon.store.files import read_json_lines
from daemon.store.records import FileProgress, HistoryRow
from daemon.store.status import StatusFile

EVENT_FIELDS = {"schema_version", "event", "id", "at", "text", "host", "pid", "status_dir", "output_dir"}
EVENT_FIELDS |= {"global_step", "state", "file", "history_row"}


class Receiver:
    """A webhook receiver on a free local port: records each POST and answers as ``mode`` says.

    Modes: ``ok`` (200), ``status`` (``status``, e.g. 500), ``hang`` (no answer until :attr:`release`
    is set, then 200), ``garbage`` (an answer that is not HTTP), ``trickle`` (one byte of a status line
    every 50 ms until :attr:`release`: a read never times out), ``redirect`` (302 to :attr:`location`).
    A GET is answered 200 and counted in :attr:`gets`.
    """

    def __init__(self, mode: str = "ok", status: int = 200) -> None:
        self.posts: list[tuple[dict[str, str], dict]] = []
        self.gets = 0
        self.location = ""
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.posts.append((dict(self.headers), body))
                if mode == "hang":
                    receiver.release.wait(60)
                if mode == "garbage":
                    self.wfile.write(b"not http at all\r\n\r\n")
                    return
                if mode == "trickle":
                    self.wfile.write(b"HTTP/1.1 200 ")
                    while not receiver.release.wait(0.05):
                        self.wfile.write(b"x")
                    return
                if mode == "redirect":
                    self.send_response(302)
                    self.send_header("Location", receiver.location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                code = status if mode == "status" else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                receiver.gets += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, name="receiver")
        self.thread.start()

    def events(self) -> list[dict]:
        return [body for _, body in self.posts]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def receivers():
    """Start receivers with ``receivers(mode, status)``; all are closed after the test."""
    started: list[Receiver] = []

    def start(mode: str = "ok", status: int = 200) -> Receiver:
        started.append(Receiver(mode, status))
        return started[-1]

    yield start
    for receiver in started:
        receiver.close()


def closed_port_url() -> str:
    """A URL on a local port nothing listens on (a receiver that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def deliveries(tree: Tree) -> list[dict]:
    return read_json_lines(tree.status / NOTIFICATIONS_FILE)


def _done_row(name: str, start: int, steps: int, quality_gate: dict | None = None) -> HistoryRow:
    progress = FileProgress(name, f"{start:064x}", 12, 2, 384, 0, start, steps)
    return HistoryRow.done(progress, time.monotonic() - 42, 1.0, 2.5, 2.7, quality_gate=quality_gate)


GATE = {
    "max_regression": 0.1,
    "on_regression": "warn",
    "regression": 0.4,
    "worst_slice": "00000003-a",
    "worst_change": 0.5,
    "slices": 1,
    "exceeded": True,
    "action": "warn",
    "errors": [],
}


def test_each_history_row_becomes_its_event_with_the_whole_row_in_it(tree):
    status = StatusFile(tree.status)
    sent: list[dict] = []
    events = Events(sent.append, tree.status, tree.output)  # no history yet: starts at its (empty) end
    status.record_outcome(_done_row("a.jsonl", 0, 3))
    status.record_outcome(_done_row("b.jsonl", 3, 3, quality_gate=GATE))
    rollback = {**GATE, "on_regression": "rollback", "action": "rollback"}
    status.record_outcome(
        HistoryRow.failed("c.jsonl", "quality gate: ... rolled back to step 6", quality_gate=rollback)
    )
    status.record_outcome(HistoryRow.failed("d.jsonl", "no usable examples"))
    status.record_outcome(HistoryRow.rolled_back("b.jsonl", f"{3:064x}", 3, 6, 3, to_step=3))
    events.poll()
    assert [(e["event"], e["file"]) for e in sent] == [
        ("file_done", "a.jsonl"),
        ("file_done", "b.jsonl"),
        ("quality_gate_warning", "b.jsonl"),
        ("file_rolled_back", "c.jsonl"),
        ("file_failed", "d.jsonl"),
        ("file_rolled_back", "b.jsonl"),
    ]
    history = tree.history()
    assert [e["history_row"] for e in sent] == [history[0], history[1], history[1], *history[2:]]
    assert all(EVENT_FIELDS <= set(e) and e["event"] in EVENT_TYPES for e in sent)
    assert len({e["id"] for e in sent}) == len(sent)
    assert sent[0]["text"] == "a.jsonl: done, steps 0 -> 3, train_loss 2.500, eval_loss 2.700, 0:42"
    assert sent[2]["quality_gate"] == GATE and "rose by 0.4000 nats" in sent[2]["text"]
    assert (sent[3]["by"], sent[5]["by"]) == ("quality_gate", "hand")
    assert sent[4]["text"] == "d.jsonl: failed: no usable examples"
    events.poll()  # nothing new: nothing sent again
    assert len(sent) == 6


def test_rows_added_while_the_daemon_was_down_are_sent_at_its_next_start_and_a_new_cursor_starts_at_the_end(tree):
    status = StatusFile(tree.status)
    status.record_outcome(_done_row("old.jsonl", 0, 3))
    sent: list[dict] = []
    Events(sent.append, tree.status, tree.output).poll()
    assert sent == []  # webhooks turned on for a status folder with a history: old files are not replayed
    status.record_outcome(_done_row("a.jsonl", 3, 3))
    Events(sent.append, tree.status, tree.output).poll()  # a daemon run: it saw a.jsonl and kept the cursor
    status.record_outcome(HistoryRow.rolled_back("a.jsonl", f"{3:064x}", 3, 6, 3, to_step=3))  # by hand, daemon down
    Events(sent.append, tree.status, tree.output).poll()  # the next start
    assert [(e["event"], e["file"]) for e in sent] == [("file_done", "a.jsonl"), ("file_rolled_back", "a.jsonl")]
    assert sent[1]["text"] == "a.jsonl: rolled back to step 3 (python -m daemon rollback)"


def test_files_trained_while_webhooks_were_off_are_not_sent_when_they_are_turned_on_again(tree, receivers):
    """Only a daemon with webhooks moved the cursor: one without them left it behind, and the next daemon with them
    announced every file the webhook-less one had trained, as if just done."""
    receiver = receivers()
    _drop(tree, "a.jsonl", '{"text": "a"}\n', arrived=1000)
    with watched(daemon := _daemon(tree, FakeTraining({})), _ops(receiver.url)):
        assert daemon.run() == 0
    _drop(tree, "b.jsonl", '{"text": "b"}\n', arrived=1001)
    with watched(daemon := _daemon(tree, FakeTraining({})), OpsArguments()):  # webhooks off
        assert daemon.run() == 0
    _drop(tree, "c.jsonl", '{"text": "c"}\n', arrived=1002)
    with watched(daemon := _daemon(tree, FakeTraining({})), _ops(receiver.url)):
        assert daemon.run() == 0
    assert [r["file"] for r in tree.history()] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    done = [e["file"] for e in receiver.events() if e["event"] == "file_done"]
    assert done == ["a.jsonl", "c.jsonl"]


def _ops(*urls: str, **options: object) -> OpsArguments:
    return OpsArguments(notify_url=list(urls), **{"notify_backoff": 0.01, **options})  # type: ignore[arg-type]


def test_a_daemon_run_sends_its_start_files_stalls_and_stop_with_the_documented_fields(tree, receivers):
    receiver = receivers()
    _drop(tree, "a.jsonl", '{"text": "a"}\n', arrived=1000)
    _drop(tree, "b.jsonl", '{"text": "b"}\n', arrived=1001)
    _drop(tree, "c.jsonl", '{"text": "c"}\n', arrived=1002)
    daemon = _daemon(tree, FakeTraining({"b.jsonl": ["bad"], "c.jsonl": ["stall", "stall"]}), max_attempts=2)
    with watched(daemon, _ops(receiver.url)):
        assert daemon.run() == 0
    events = receiver.events()  # close() delivered everything before watched() returned
    assert [(e["event"], e["file"]) for e in events] == [
        ("daemon_started", None),
        ("file_done", "a.jsonl"),
        ("file_failed", "b.jsonl"),
        ("stalled", "c.jsonl"),
        ("stalled", "c.jsonl"),
        ("file_failed", "c.jsonl"),
        ("daemon_stopped", None),
    ]
    assert all(EVENT_FIELDS <= set(e) for e in events)
    history = tree.history()
    assert [e["history_row"] for e in events if e["history_row"]] == history
    assert [(e["attempt"], e["max_attempts"]) for e in events if e["event"] == "stalled"] == [(1, 2), (2, 2)]
    assert "the training process was killed (attempt 2 of 2; it is failed)" in events[4]["text"]
    assert events[-1]["reason"] == "inbox drained (--once)" and events[-1]["global_step"] == 3
    assert events[0]["state"] == "starting" and events[1]["status_dir"] == str(tree.status.absolute())
    headers = receiver.posts[1][0]
    assert headers["Content-Type"] == "application/json"
    assert (headers["X-Continual-Event"], headers["X-Continual-Event-Id"]) == ("file_done", events[1]["id"])
    assert [(d["event"], d["result"], d["attempts"]) for d in deliveries(tree)] == [
        (e["event"], "delivered", 1) for e in events
    ]


def test_a_receiver_that_never_answers_does_not_hold_the_daemon_or_its_files(tree, receivers):
    silent = receivers("hang")
    for i, name in enumerate(("a.jsonl", "b.jsonl")):
        _drop(tree, name, f'{{"text": "{name}"}}\n', arrived=1000 + i)
    daemon = _daemon(tree, FakeTraining())
    with watched(daemon, _ops(silent.url, notify_timeout=60)):
        wait_for(lambda: silent.posts, timeout=30, what="the first POST to reach the receiver")
        assert daemon.run() == 0  # returns while the notifier still waits for the first answer
        assert sorted(p.name for p in (tree.inbox / "done").iterdir()) == ["a.jsonl", "b.jsonl"]
        assert [e["event"] for e in silent.events()] == ["daemon_started"]  # the rest still queued
        silent.release.set()
    assert [e["event"] for e in silent.events()] == ["daemon_started", "file_done", "file_done", "daemon_stopped"]


def test_failed_posts_are_retried_a_bounded_number_of_times_then_logged_undelivered(tree, receivers, caplog):
    failing, slow, refusing, garbled = (
        receivers("status", 500),
        receivers("hang"),
        receivers("status", 404),
        receivers("garbage"),
    )
    down = closed_port_url()
    urls = [down, failing.url, slow.url, refusing.url, garbled.url]
    notifier = Notifier(urls, tree.status, timeout=1.0, retries=2, backoff=0.01)  # the slow one: 3 s
    try:
        notifier.send({"event": "file_done", "id": "e1", "file": "a.jsonl"})
        wait_for(lambda: len(deliveries(tree)) == len(urls), timeout=30, what="every URL's outcome")
    finally:
        notifier.close()
    by_url = {urls[d["receiver"] - 1]: d for d in deliveries(tree)}
    assert all(d["url"] == redact(urls[d["receiver"] - 1]) for d in deliveries(tree))
    assert by_url[down]["result"] == "undelivered" and by_url[down]["attempts"] == 3
    assert "Connection refused" in by_url[down]["error"] or "ConnectionRefused" in by_url[down]["error"]
    assert (by_url[failing.url]["attempts"], by_url[failing.url]["status"]) == (3, 500)
    assert len(failing.posts) == 3 and {h["X-Continual-Event-Id"] for h, _ in failing.posts} == {"e1"}
    assert by_url[slow.url]["attempts"] == 3 and "timed out" in by_url[slow.url]["error"]
    assert (by_url[refusing.url]["attempts"], by_url[refusing.url]["status"]) == (1, 404)  # a 4xx is final
    assert by_url[garbled.url]["attempts"] == 3 and "BadStatusLine" in by_url[garbled.url]["error"]
    assert notifier.counts == {"delivered": 0, "undelivered": len(urls), "dropped": 0}
    assert f"event file_done e1 not delivered to {redact(down)} (#1) after 3 attempts" in caplog.text


def test_a_loss_that_is_not_a_number_is_sent_as_null(tree, receivers):
    receiver = receivers()
    notifier = Notifier([receiver.url], tree.status)
    try:
        notifier.send({"event": "file_done", "id": "n1", "history_row": {"eval_loss": float("nan"), "steps": [1]}})
    finally:
        notifier.close()
    assert receiver.events() == [{"event": "file_done", "id": "n1", "history_row": {"eval_loss": None, "steps": [1]}}]


def test_a_full_queue_drops_its_oldest_event_with_a_line(tree, receivers, caplog):
    silent = receivers("hang")
    notifier = Notifier([silent.url], tree.status, timeout=30, queue_size=2)
    try:
        notifier.send({"event": "file_done", "id": "e1"})
        wait_for(lambda: silent.posts, timeout=30, what="the first POST")  # e1 is in flight, out of the queue
        for i in (2, 3, 4):
            notifier.send({"event": "file_done", "id": f"e{i}"})
        assert not (tree.status / NOTIFICATIONS_FILE).exists()  # send() did no I/O: the URL's thread records it
        silent.release.set()
    finally:
        notifier.close()
    assert f"notification queue of {redact(silent.url)} (#1) full: dropped the oldest event file_done e2" in caplog.text
    assert [body["id"] for body in silent.events()] == ["e1", "e3", "e4"]
    assert [(d["id"], d["result"]) for d in deliveries(tree)] == [
        ("e1", "delivered"),
        ("e2", "dropped"),
        ("e3", "delivered"),
        ("e4", "delivered"),
    ]


def test_notify_urls_add_up_across_flags_and_the_config_file_and_stay_the_daemons(tmp_path):
    config = write_jsonl(tmp_path / "c.json", [])  # replaced below: a JSON mapping
    config.write_text(json.dumps({"notify_url": ["http://a.example/hook"], "notify_retries": 1, "seed": 3}))
    argv = ["--config", str(config), "--notify_url", "http://b.example/x", "--notify_url", "https://c.example/y"]
    _, ops, train_argv = parse_daemon_args([*argv, "--metrics_port", "0"])
    assert ops.notify_url == ["http://a.example/hook", "http://b.example/x", "https://c.example/y"]
    assert (ops.notify_retries, ops.metrics_port, ops.metrics_host) == (1, 0, "127.0.0.1")
    assert train_argv == ["--seed", "3"]  # the training processes never see the daemon's keys
    with pytest.raises(ConfigError, match="--notify_url ftp://x/…: not an http"):
        parse_daemon_args(["--notify_url", "ftp://x"])
    with pytest.raises(ConfigError, match="--metrics_port must be a port number"):
        OpsArguments(metrics_port=70000)


def test_every_invalid_daemon_option_is_named_in_one_message():
    with pytest.raises(ConfigError) as raised:
        parse_daemon_args(["--notify_url", "ftp://x", "--settle_seconds", "-1", "--notify_retries", "-1"])
    message = str(raised.value)
    assert "--settle_seconds must be >= 0" in message
    assert "--notify_url ftp://x/…: not an http" in message and "--notify_retries must be >= 0" in message


def test_close_returns_within_its_bound_while_a_receiver_trickles_an_answer_that_never_ends(tree, receivers, caplog):
    trickling = receivers("trickle")  # every read gets a byte before --notify_timeout: urllib never times out
    notifier = Notifier([trickling.url], tree.status, timeout=1.0, retries=0)
    notifier.send({"event": "file_done", "id": "e1"})
    notifier.send({"event": "daemon_stopped", "id": "e2"})
    wait_for(lambda: trickling.posts, timeout=30, what="the POST to reach the receiver")
    closing = threading.Thread(target=notifier.close)
    closing.start()
    closing.join(60)  # the bound is max(2 * 1, 1) + 1 s; 60 only keeps a broken close() from hanging the suite
    assert not closing.is_alive()
    (channel,) = notifier.channels
    assert channel.thread.is_alive()  # still reading the endless answer: left behind, a daemon thread
    assert f"a POST to {redact(trickling.url)} (#1) is still in flight" in caplog.text
    assert [(d["id"], d["result"], d["error"]) for d in deliveries(tree)] == [
        ("e1", "undelivered", "still in flight when the daemon stopped"),
        ("e2", "undelivered", STOPPED),
    ]
    trickling.release.set()
    channel.thread.join(30)
    assert len(deliveries(tree)) == 2  # the left-behind thread records nothing more once it returns


def test_a_dead_receiver_does_not_hold_up_the_others_even_at_stop(tree, receivers):
    dead, live = receivers("trickle"), receivers()
    for i, name in enumerate(("a.jsonl", "b.jsonl")):
        _drop(tree, name, f'{{"text": "{name}"}}\n', arrived=1000 + i)
    daemon = _daemon(tree, FakeTraining())
    with watched(daemon, _ops(dead.url, live.url, notify_timeout=1.0, notify_retries=0)):
        assert daemon.run() == 0
    expected = ["daemon_started", "file_done", "file_done", "daemon_stopped"]
    assert [e["event"] for e in live.events()] == expected
    assert [e["event"] for e in dead.events()] == ["daemon_started"]  # its answer never ended
    by_receiver = {(d["receiver"], d["event"], d["result"]) for d in deliveries(tree)}
    assert by_receiver == {(2, event, "delivered") for event in expected} | {(1, e, "undelivered") for e in expected}


def test_a_webhook_url_with_secrets_is_never_written_whole(tree, receivers, caplog):
    failing = receivers("status", 500)
    port = failing.server.server_port
    token_url = f"http://127.0.0.1:{port}/services/T0KEN/s3cret?sig=abc"  # a chat webhook's secret path
    password_url = f"http://user:pa55word@127.0.0.1:{port}/hook"  # urllib takes "user:pa55word@127..." as the host
    notifier = Notifier([token_url, password_url], tree.status, timeout=5.0, retries=0)
    try:
        notifier.send({"event": "file_done", "id": "e1"})
        wait_for(lambda: len(deliveries(tree)) == 2, timeout=30, what="both outcomes")
    finally:
        notifier.close()
    by_receiver = {d["receiver"]: d for d in deliveries(tree)}
    assert (by_receiver[1]["url"], by_receiver[1]["status"]) == (f"http://127.0.0.1:{port}/…", 500)
    assert by_receiver[2]["url"] == f"http://127.0.0.1:{port}/…" and by_receiver[2]["result"] == "undelivered"
    assert f"not delivered to http://127.0.0.1:{port}/… (#1) after 1 attempts: HTTP 500" in caplog.text
    written = (tree.status / NOTIFICATIONS_FILE).read_text() + caplog.text
    for secret in ("user", "pa55word", "T0KEN", "s3cret", "sig=abc"):
        assert secret not in written
    with pytest.raises(ConfigError) as raised:
        OpsArguments(notify_url=["ftp://user:pa55word@host/T0KEN"])
    assert "pa55word" not in str(raised.value) and "T0KEN" not in str(raised.value)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://[oops/T0KEN", "--notify_url <a URL that does not parse>: Invalid IPv6 URL"),
        ("http://127.0.0.1:9/hook/T0KEN s3cret", "--notify_url http://127.0.0.1:9/…: holds a space or a control"),
        ("http://127.0.0.1:9/hook/T0KEN\ts3cret", "--notify_url http://127.0.0.1:9/…: holds a space or a control"),
    ],
)
def test_a_webhook_url_that_cannot_be_posted_to_is_refused_in_one_line_that_keeps_its_secret(url, why):
    """An unclosed IPv6 bracket made redact() raise ValueError (a traceback); a space or a control character passed,
    and every POST then failed with http.client's InvalidURL, whose message quoted the path."""
    with pytest.raises(ConfigError) as raised:
        parse_daemon_args(["--notify_url", url])
    assert str(raised.value).startswith(why) and "T0KEN" not in str(raised.value)


def test_a_url_http_client_refuses_is_one_final_failure_that_keeps_its_secret(tree, caplog):
    notifier = Notifier(["http://127.0.0.1:9/hook/T0KEN s3cret"], tree.status, timeout=1.0, retries=3, backoff=0.01)
    try:
        notifier.send({"event": "file_done", "id": "e1"})
        wait_for(lambda: len(deliveries(tree)) == 1, timeout=30, what="the outcome")
    finally:
        notifier.close()
    (delivery,) = deliveries(tree)
    assert (delivery["result"], delivery["attempts"]) == ("undelivered", 1)  # not retried: it can never succeed
    assert "not a URL that can be POSTed to" in delivery["error"]
    written = (tree.status / NOTIFICATIONS_FILE).read_text() + caplog.text
    assert "T0KEN" not in written and "s3cret" not in written


@pytest.mark.parametrize("flag", ["notify_timeout", "notify_backoff"])
@pytest.mark.parametrize("seconds", [float("inf"), float("nan"), 3601.0])
def test_webhook_seconds_that_would_overflow_the_clock_are_refused(flag, seconds):
    """--notify_timeout inf was accepted; the first POST and the stop then raised OverflowError."""
    with pytest.raises(ConfigError, match=f"--{flag} must be .* at most 3600 seconds"):
        OpsArguments(**{flag: seconds})


def test_a_redirect_is_a_final_failure_that_names_where_to_send_it(tree, receivers):
    moved, elsewhere = receivers("redirect"), receivers()
    moved.location = elsewhere.url  # it answers a GET with 200: following the redirect would look delivered
    notifier = Notifier([moved.url], tree.status, timeout=5.0, retries=3, backoff=0.01)
    try:
        notifier.send({"event": "file_done", "id": "e1"})
        wait_for(lambda: deliveries(tree), timeout=30, what="the outcome")
    finally:
        notifier.close()
    (delivery,) = deliveries(tree)
    assert (delivery["result"], delivery["attempts"], delivery["status"]) == ("undelivered", 1, 302)
    assert delivery["error"] == f"HTTP 302: redirected to {redact(elsewhere.url)}: use that URL"
    assert (len(moved.posts), elsewhere.gets, elsewhere.posts) == (1, 0, [])


def test_a_history_row_that_cannot_be_announced_does_not_lose_the_rows_after_it(tree, caplog):
    sent: list[dict] = []
    events = Events(sent.append, tree.status, tree.output)
    partial_gate = {"action": "warn", "regression": 0.4}  # a gate row without all its figures
    rows = [
        {**_done_row("a.jsonl", 0, 3).as_dict(), "quality_gate": partial_gate},
        ["not", "a", "row"],
        {**_done_row("b.jsonl", 3, 3).as_dict(), "train_loss": "not a number"},
        _done_row("c.jsonl", 6, 3).as_dict(),
    ]
    write_jsonl(tree.status / "history.jsonl", rows)
    with caplog.at_level(logging.ERROR):
        events.poll()
    assert [(e["event"], e["file"]) for e in sent] == [
        ("file_done", "a.jsonl"),
        ("quality_gate_warning", "a.jsonl"),
        ("file_done", "c.jsonl"),
    ]
    assert sent[1]["text"] == "a.jsonl: the quality gate warned (its figures: quality_gate)"
    assert "history.jsonl line 2: no event sent" in caplog.text and "history.jsonl line 3: no event sent" in caplog.text
    events.poll()
    assert len(sent) == 3 and caplog.text.count("no event sent") == 2  # each bad row logged once


def test_a_history_that_cannot_be_read_at_start_leaves_no_notifier_thread(tree, receivers):
    receiver = receivers()
    (tree.status / "history.jsonl").mkdir(parents=True)  # read_text raises IsADirectoryError
    daemon = _daemon(tree, FakeTraining())
    with pytest.raises(IsADirectoryError), watched(daemon, _ops(receiver.url)):
        pass
    assert not [t for t in threading.enumerate() if redact(receiver.url) in t.name]


def test_daemon_started_is_sent_even_when_the_status_cannot_be_read(tree, receivers):
    sent: list[dict] = []
    events = Events(sent.append, tree.status, tree.output)
    StatusFile(tree.status).path.mkdir(parents=True)  # reading the status raises IsADirectoryError
    events.started()
    assert sent == []  # emit() could not read it either: logged, nothing raised
