"""``python -m daemon status --watch``: the live view's content and width, and its exit on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, fake_status_folder, wait_for
from rich.console import Console

from daemon.store.status import StatusFile, empty_status
from daemon.views.live import render


def _text(doc: dict) -> str:
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(render(doc))
    console.file.close()
    return console.export_text()


def test_the_live_view_shows_state_progress_metrics_queue_and_error_within_80_columns(tmp_path):
    doc = StatusFile(fake_status_folder(tmp_path / "status")).read()
    doc["last_error"]["message"] = "a very long reason " * 20
    doc["queue"] = [f"drop-2026-02-{day:02d}-with-a-long-name.jsonl" for day in range(1, 9)]
    text = _text(doc)
    assert "training" in text and "step 127 of 160" in text
    assert "drop-2026-01-08.jsonl" in text and "7/40 18% eta 0:41" in text
    assert "2.3100" in text and "tokens/s 2,410" in text
    assert "3 done, 1 failed, 2 queued" in text
    assert "drop-2026-02-01-with-a-long-name.jsonl" in text
    assert "bad<script>.jsonl: a very long reason" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_the_live_view_of_an_empty_status_has_no_progress_bar():
    text = _text(empty_status())
    assert "idle" in text and "error    none" in text and "eta" not in text


def test_watch_exits_cleanly_on_ctrl_c(tmp_path):
    fake_status_folder(tmp_path / "status")
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    # A terminal (not dumb) as rich sees it, so Live redraws into the file while it runs.
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80", "TERM": "xterm", "FORCE_COLOR": "1"}
    # SIGINT at its default, as in a terminal, whatever this test run inherited: a shell ignores SIGINT
    # in what it starts with `cmd &` (and nohup SIGHUP), and an ignored signal stays ignored across exec.
    reset = "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)"
    run = "sys.argv[0] = 'daemon'; runpy.run_module('daemon', run_name='__main__')"
    argv = [sys.executable, "-c", f"{reset}; {run}", "status", "--watch", "--status_dir", str(tmp_path / "status")]
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err, env=env)
    try:
        wait_for(lambda: "step 127 of 160" in out_path.read_text(), 20, "the first view")
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # say what the process was doing (state, signal masks, output)
            states = [line for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                      if line.startswith(("State", "SigBlk", "SigIgn", "SigCgt", "Threads"))]  # fmt: skip
            pytest.fail(f"no exit 5 s after SIGINT: {states}; stderr: {err_path.read_text()[-2000:]!r}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert time.monotonic() - started < 3
    assert "Traceback" not in err_path.read_text() and "KeyboardInterrupt" not in err_path.read_text()
