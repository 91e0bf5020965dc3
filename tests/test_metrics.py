"""Prometheus metrics (``--metrics_port``): a status folder served by the real endpoint, scraped and parsed.

Each test starts :func:`~daemon.service.metrics.serve_metrics` on a free loopback port, scrapes
``/metrics`` with urllib and parses it with ``prometheus_client``'s own parser.
"""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest
from helpers import fake_status_folder
from prometheus_client.parser import text_string_to_metric_families

from daemon.exceptions import ConfigError
from daemon.service.metrics import serve_metrics
from daemon.store.records import HistoryRow, RunState
from daemon.store.status import StatusFile

GATE = {"max_regression": 0.25, "on_regression": "rollback", "regression": 0.31, "action": "rollback"}


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {sorted labels: value}}`` of one scrape of ``url``."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def one(samples: dict, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


@pytest.fixture
def served(tmp_path):
    """A status folder as a daemon leaves it mid-file, with a gate, a guard and two rollbacks; and its endpoint."""
    status_dir = fake_status_folder(tmp_path / "status")
    status = StatusFile(status_dir)
    status.record_outcome(HistoryRow.failed("gated.jsonl", "quality gate: rolled back to step 120", quality_gate=GATE))
    status.record_outcome(HistoryRow.rolled_back("drop-2026-01-03.jsonl", f"{2:064x}", 80, 120, 40, to_step=80))
    guard = {"workers": 2, "dropped_shards": 3, "skipped_steps": 1, "last_grad_norm": 0.8}
    status.update(quality_gate=GATE, gradient_guard=guard, progress_at=time.time() - 30)
    server = serve_metrics(status_dir, "127.0.0.1", 0)
    try:
        yield status, server
    finally:
        server.close()


def test_a_scrape_shows_the_status_files_figures(served):
    status, server = served
    doc = status.read()
    samples = scrape(server.url)
    assert server.url == f"http://127.0.0.1:{server.port}/metrics" and server.port > 0
    assert one(samples, "continual_global_step") == doc["global_step"] == 127
    for outcome in ("done", "failed", "queued", "rolled_back"):
        assert one(samples, "continual_files", outcome=outcome) == doc["files"].get(outcome, 0)
    assert doc["files"] == {"queued": 2, "done": 2, "failed": 2, "rolled_back": 1}  # what the fixture wrote
    assert one(samples, "continual_tokens_per_second") == doc["metrics"]["tokens_per_second"] == 2410.5
    assert one(samples, "continual_training_loss") == doc["metrics"]["loss"]
    assert one(samples, "continual_current_file_progress") == doc["current_file"]["progress"]
    assert one(samples, "continual_last_regression_nats") == 0.31
    assert one(samples, "continual_max_regression_nats") == 0.25
    for name in ("workers", "dropped_shards", "skipped_steps"):
        assert one(samples, f"continual_gradient_guard_{name}") == doc["gradient_guard"][name]
    assert one(samples, "continual_rollbacks_total", by="hand") == 1
    assert one(samples, "continual_rollbacks_total", by="quality_gate") == 1
    assert one(samples, "continual_state", state="training") == 1
    assert sum(samples["continual_state"].values()) == 1 and len(samples["continual_state"]) == len(RunState)
    assert 30 <= one(samples, "continual_heartbeat_age_seconds") < 3600
    assert 0 <= one(samples, "continual_status_age_seconds") < 3600
    assert "process_resident_memory_bytes" in samples  # the daemon process's own
    assert "continual_notifications_total" not in samples  # no --notify_url


def test_every_scrape_reads_the_status_anew_and_leaves_out_what_is_not_known(served):
    status, server = served
    status.update(
        lambda doc: doc.update(global_step=200, state=RunState.IDLE, quality_gate=None, metrics={"loss": None})
    )
    status.record_outcome(HistoryRow.rolled_back("drop-2026-01-02.jsonl", f"{1:064x}", 40, 80, 40, to_step=40))
    samples = scrape(server.url)
    assert one(samples, "continual_global_step") == 200
    assert one(samples, "continual_state", state="idle") == 1 and one(samples, "continual_state", state="training") == 0
    assert one(samples, "continual_rollbacks_total", by="hand") == 2
    absent = {"continual_tokens_per_second", "continual_training_loss", "continual_last_regression_nats"}
    assert absent.isdisjoint(samples)  # not known: left out, not reported as 0


def test_the_notifiers_counts_are_served_with_it(tmp_path):
    counts = {"delivered": 5, "undelivered": 1, "dropped": 0}
    server = serve_metrics(tmp_path, "127.0.0.1", 0, notifications=lambda: counts)
    try:
        samples = scrape(server.url)
    finally:
        server.close()
    assert {dict(k)["result"]: v for k, v in samples["continual_notifications_total"].items()} == counts


def test_a_port_already_taken_is_one_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--metrics_host 127.0.0.1 --metrics_port {port}: cannot listen there"):
            serve_metrics(tmp_path, "127.0.0.1", port)
