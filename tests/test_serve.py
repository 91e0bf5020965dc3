"""``python -m daemon serve``: transformers' OpenAI-compatible server, following the export, queried with ``openai``.

The server runs as users run it (a process of its own, on loopback, offline) on a folder the
product exports to (:func:`helpers.export_tiny`, ``export_model``: files moved in under the
publishing marker, ``export.json`` last). Requests go through the ``openai`` client without retries,
so a request failing across the swap fails the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import REPO, export_tiny, run_cli, wait_for

from daemon.store import checkpoints

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


def _model_processes(server_pid: int) -> list[psutil.Process]:
    """The server's model processes (transformers starts each with multiprocessing's spawn)."""
    found = []
    for process in psutil.Process(server_pid).children():
        try:
            if "spawn_main" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:  # exited (a zombie until the server reaps it): not a model process any more
            pass
    return found


def _the_model_process(server_pid: int) -> psutil.Process | None:
    """The server's model process once it has only one (a stopped one can take a moment to exit)."""
    found = _model_processes(server_pid)
    return found[0] if len(found) == 1 else None


def _answers(client) -> str | None:
    """The step that answers a completion now, or None when the request fails."""
    import openai

    try:
        raw = client.completions.with_raw_response.create(model="current_model", prompt="def ", max_tokens=2)
    except openai.APIError:
        return None
    return raw.headers["x-global-step"]


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


@contextlib.contextmanager
def _serving(output: Path, log_path: Path) -> Iterator[subprocess.Popen]:
    """``python -m daemon serve`` on ``output``, on a free loopback port (``server.base``), until the block ends."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = ["-m", "daemon", "serve", "--output_dir", str(output), "--port", str(port), "--poll_seconds", "0.2"]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, *command], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        server.base = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        try:
            wait_for(lambda: server.poll() is not None or _models(server.base), SERVER_START_SECONDS, "the server")
            assert server.poll() is None, log_path.read_text()
            yield server
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)


def test_the_server_follows_each_export_without_a_failed_request(tmp_path):
    import openai

    output = tmp_path / "current_model"
    output.mkdir()
    log_path = tmp_path / "serve.log"
    with _serving(output, log_path) as server:
        base = server.base
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="local", timeout=REQUEST_SECONDS, max_retries=0)

        # Started before the first export: it answers 503 (which clients retry), then serves the export.
        assert _models(base)[0]["status"]["value"] == "unloaded"
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="current_model", prompt="def ", max_tokens=2)
        assert refused.value.status_code == 503
        export_tiny(output, global_step=1)
        assert wait_for(lambda: _loaded_step(base), LOAD_SECONDS, "the first export") == 1

        chat = client.chat.completions.with_raw_response.create(
            model="current_model", messages=[{"role": "user", "content": "import json"}], max_tokens=4
        )
        assert chat.headers["x-global-step"] == "1"
        assert chat.parse().model == "current_model" and chat.parse().usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="another", prompt="def ", max_tokens=2)
        assert "current_model" in refused.value.response.json()["detail"]

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
        (snapshots,) = [p for p in output.glob(f".serving-*-{server.pid}-*") if p.is_dir()]
        wait_for(lambda: len(list(snapshots.iterdir())) == 1, LOAD_SECONDS, "the step-1 export to be stopped")
        model_process = wait_for(lambda: _the_model_process(server.pid), LOAD_SECONDS, "one model process")

        # A model process that dies (killed for memory, say) is replaced by the same export loaded again.
        model_process.kill()
        wait_for(lambda: _answers(client) == "2", LOAD_SECONDS, "answers of step 2 again")
        revived = wait_for(lambda: _the_model_process(server.pid), LOAD_SECONDS, "the revived model process")
        assert revived.pid != model_process.pid
        processes = psutil.Process(server.pid).children(recursive=True)

        # A rollback to step 0 removes the export: no model is served (a 503) rather than the undone one.
        checkpoints.roll_back(output, 0)
        wait_for(lambda: _models(base)[0]["status"]["value"] == "unloaded", LOAD_SECONDS, "the export to go")
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="current_model", prompt="def ", max_tokens=2)
        assert refused.value.status_code == 503
        wait_for(lambda: not _model_processes(server.pid), LOAD_SECONDS, "the step-2 model process to stop")
        wait_for(lambda: not list(snapshots.iterdir()), LOAD_SECONDS, "the step-2 snapshot to go")

        # SIGTERM: a clean stop, its model processes and snapshots gone.
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, log_path.read_text()
        assert not list(output.glob(".serving-*"))
        wait_for(lambda: not any(p.is_running() for p in processes), 30, "the model processes to exit")
        assert "serving the export of step 2" in log_path.read_text()


def test_serve_without_the_output_folder_says_so_in_one_line(tmp_path: Path):
    result = run_cli(["-m", "daemon", "serve", "--output_dir", str(tmp_path / "missing")], cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --output_dir {tmp_path / 'missing'} is not a folder: start the daemon (or train a file) first"
    ]


def test_serve_on_a_port_in_use_says_so_in_one_line_before_anything_loads(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(["-m", "daemon", "serve", "--output_dir", str(tmp_path), "--port", str(port)], cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in use)"
    ]
    assert list(tmp_path.iterdir()) == []  # no snapshot folder either


def test_serve_on_a_device_this_machine_lacks_says_so_in_one_line(tmp_path: Path):
    command = ["-m", "daemon", "serve", "--output_dir", str(tmp_path), "--port", "0", "--device", "cuda:99"]
    result = run_cli(command, cwd=REPO)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --device cuda:99: this machine has ")  # no cuda device, or fewer than 100
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device", ["hpu", "xla:0", "maia"])
def test_a_device_type_torch_has_no_backend_for_here_is_refused_in_one_line(device: str):
    """torch.device() parses these, but this torch has no module for them: the server would start and 503 everything."""
    from daemon.exceptions import ConfigError
    from daemon.serving.cli import check_device

    with pytest.raises(ConfigError, match=rf"^--device {device}: this machine has no .* device \(torch sees none\)$"):
        check_device(device)


def test_serve_with_an_older_transformers_names_the_tested_one(tmp_path: Path, monkeypatch):
    from daemon.exceptions import ConfigError
    from daemon.serving import cli

    monkeypatch.setitem(sys.modules, "transformers.cli.serving.systemone", None)  # as if it were missing
    monkeypatch.delitem(sys.modules, "daemon.serving.app", raising=False)
    with pytest.raises(ConfigError, match=r"needs transformers 5\.25 \(tested; installed: 5\."):
        cli.main(["--output_dir", str(tmp_path), "--port", "0"])
    assert list(tmp_path.iterdir()) == []


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
    models.shutdown()  # transformers' /reset, and its app stopping: the export stays loaded
    assert not new.stopped
    models.close()
    assert new.stopped
