"""``python -m daemon serve``: transformers' OpenAI-compatible server, following the export, queried with ``openai``.

The server runs as users run it (a process of its own, on loopback, offline) on a folder the
product exports to (:func:`helpers.export_tiny`, ``export_model``: files moved in under the
publishing marker, ``export.json`` last). Requests go through the ``openai`` client without retries,
so a request failing across the swap fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import psutil
from helpers import REPO, export_tiny, run_cli, wait_for

SERVER_START_SECONDS = 120  # importing torch, transformers and fastapi on a busy 2-core machine
LOAD_SECONDS = 120  # an export noticed, linked, loaded in a process of its own
REQUEST_SECONDS = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _models(base: str) -> list[dict] | None:
    try:
        with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as response:
            return json.loads(response.read())["data"]
    except OSError:
        return None


def _loaded_step(base: str) -> int | None:
    models = _models(base)
    return models[0]["global_step"] if models else None


class _Asker(threading.Thread):
    """Asks for completions one after another until stopped: the step that answered each, or the error."""

    def __init__(self, client, model: str, stop: threading.Event) -> None:
        super().__init__(name="asker")
        self.client, self.model, self.stop = client, model, stop
        self.steps: list[int] = []
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                raw = self.client.completions.with_raw_response.create(model=self.model, prompt="def ", max_tokens=2)
                assert raw.parse().choices[0].finish_reason in ("length", "stop")
                self.steps.append(int(raw.headers["x-global-step"]))
            except Exception as e:  # every kind counts: the test asserts there is none
                self.errors.append(f"{type(e).__name__}: {e}")


def test_the_server_follows_each_export_without_a_failed_request(tmp_path):
    import openai

    output = tmp_path / "current_model"
    output.mkdir()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "serve.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed in finally
    command = ["-m", "daemon", "serve", "--output_dir", str(output), "--port", str(port), "--poll_seconds", "0.2"]
    server = subprocess.Popen(
        [sys.executable, *command], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        wait_for(lambda: server.poll() is not None or _models(base), SERVER_START_SECONDS, "the server")
        assert server.poll() is None, log_path.read_text()
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="local", timeout=REQUEST_SECONDS, max_retries=0)

        # Started before the first export: it answers 503 (which clients retry), then serves the export.
        assert _models(base)[0]["status"]["value"] == "unloaded"
        try:
            client.completions.create(model="current_model", prompt="def ", max_tokens=2)
            raise AssertionError("answered without a model")
        except openai.APIStatusError as e:
            assert e.status_code == 503
        export_tiny(output, global_step=1)
        assert wait_for(lambda: _loaded_step(base), LOAD_SECONDS, "the first export") == 1

        chat = client.chat.completions.with_raw_response.create(
            model="current_model", messages=[{"role": "user", "content": "import json"}], max_tokens=4
        )
        assert chat.headers["x-global-step"] == "1"
        assert chat.parse().model == "current_model" and chat.parse().usage.completion_tokens >= 1
        try:
            client.completions.create(model="another", prompt="def ", max_tokens=2)
            raise AssertionError("answered for another model")
        except openai.BadRequestError as e:
            assert "current_model" in e.response.json()["detail"]

        # The swap, with requests running on two threads all along.
        stop = threading.Event()
        askers = [_Asker(client, "current_model", stop) for _ in range(2)]
        for asker in askers:
            asker.start()
        try:
            wait_for(lambda: all(len(a.steps) >= 2 or a.errors for a in askers), REQUEST_SECONDS, "answers of step 1")
            export_tiny(output, global_step=2)
            wait_for(lambda: all(a.steps.count(2) >= 2 or a.errors for a in askers), LOAD_SECONDS, "answers of step 2")
        finally:
            stop.set()
            for asker in askers:
                asker.join()
        for asker in askers:
            assert asker.errors == []
            switch = asker.steps.index(2)
            assert switch >= 2 and asker.steps == [1] * switch + [2] * (len(asker.steps) - switch)
        assert _loaded_step(base) == 2

        # The replaced export's process stops and its snapshot goes once its requests are answered.
        snapshots = output / f".serving-{server.pid}"
        wait_for(lambda: len(list(snapshots.iterdir())) == 1, LOAD_SECONDS, "the step-1 export to be stopped")
        model_processes = [p for p in psutil.Process(server.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        assert len(model_processes) == 1
        processes = psutil.Process(server.pid).children(recursive=True)

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, log_path.read_text()
        assert not list(output.glob(".serving-*"))
        wait_for(lambda: not any(p.is_running() for p in processes), 30, "the model processes to exit")
        assert "serving the export of step 2" in log_path.read_text()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()


def test_serve_without_the_output_folder_says_so_in_one_line(tmp_path: Path):
    result = run_cli(["-m", "daemon", "serve", "--output_dir", str(tmp_path / "missing")], cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --output_dir {tmp_path / 'missing'} is not a folder: start the daemon (or train a file) first"
    ]


class _FakeEngine:
    """An engine's bookkeeping without a model: what ExportModels reads and calls."""

    def __init__(self, global_step: int) -> None:
        self.global_step, self.leases, self.is_dead, self.stopped = global_step, 0, False, False

    def shutdown(self, reason: str = "") -> None:
        self.stopped = True


def test_a_replaced_export_stops_only_once_its_last_request_is_answered():
    import contextvars

    from daemon.serving.engines import _LEASES, ExportModels

    models = ExportModels(None, None, "current_model", "current_model")
    old, new = _FakeEngine(1), _FakeEngine(2)
    models.swap(old)

    def request() -> list:  # what StepHeader does around one request: its leases, in a context of its own
        leases: list = []
        _LEASES.set(leases)
        assert models.get_engine("current_model") is leases[-1]
        return leases

    in_flight = contextvars.Context().run(request)
    assert in_flight == [old] and old.leases == 1
    models.swap(new)
    answered_after = contextvars.Context().run(request)
    assert answered_after == [new]
    assert models.stop_idle() == [] and not old.stopped  # its request is still being answered
    models.release(in_flight)
    assert models.stop_idle() == [old] and old.stopped and not new.stopped
    models.release(answered_after)
    models.shutdown()
    assert new.stopped
