"""daemon/serving/follower.py: what the server does with each state of the export folder, without a model.

The follower runs as the server runs it, on a folder the product's own code writes and rolls
back, with a stand-in for the engine (the ``engine`` factory): loading a real model is
tests/test_serve.py's. Each test drives :meth:`ExportFollower.check` as the polling thread does.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fastapi import HTTPException

from daemon.serving import follower as follower_module
from daemon.serving.engines import ExportModels
from daemon.serving.follower import MARKER_POLLS, ExportFollower, work_dir
from daemon.store import checkpoints
from daemon.store.export_snapshot import PUBLISHING


class _Engine:
    """An export's engine without a model: what the follower and ExportModels read and call."""

    def __init__(self, folder: Path, global_step: int) -> None:
        self.folder, self.global_step = folder, global_step
        self.leases, self.is_dead, self.stopped = 0, False, False

    def shutdown(self, reason: str = "") -> None:
        self.stopped = True


class _Engines:
    """The follower's ``engine`` factory: an :class:`_Engine` per load, or ``fail[step]`` raised."""

    def __init__(self) -> None:
        self.made: list[_Engine] = []
        self.fail: dict[int, BaseException] = {}
        self.calls = 0

    def __call__(self, folder: Path, global_step: int, served_name: str, loader, generation_state) -> _Engine:
        self.calls += 1
        assert (folder / "model.safetensors").read_text() == f"weights {global_step}"  # the snapshot, whole
        if global_step in self.fail:
            raise self.fail[global_step]
        self.made.append(_Engine(folder, global_step))
        return self.made[-1]


def _export(root: Path, step: int) -> None:
    """An export as the product installs one: model files, then ``export.json``, each replaced whole."""
    for name, text in {"config.json": '{"model_type": "llama"}', "model.safetensors": f"weights {step}"}.items():
        (root / f".{name}.tmp").write_text(text)
        os.replace(root / f".{name}.tmp", root / name)
    (root / ".export.json.tmp").write_text(json.dumps({"global_step": step}))
    os.replace(root / ".export.json.tmp", root / "export.json")


@pytest.fixture
def following(tmp_path: Path):
    """A follower of ``tmp_path/current_model`` with stand-in engines: (follower, engines, output folder)."""
    output = tmp_path / "current_model"
    output.mkdir()
    models = ExportModels(None, None, "current_model", str(output))
    engines = _Engines()
    follower = ExportFollower(models, output, work_dir(output), None, None, poll_seconds=0.01, engine=engines)
    yield follower, engines, output
    follower.close()


def _served(follower: ExportFollower) -> int | None:
    current = follower.models.current
    return None if current is None else current.global_step


def test_an_export_that_fails_to_load_leaves_the_old_one_serving_until_export_json_changes(following, caplog):
    follower, engines, output = following
    _export(output, 1)
    assert follower.check() == 1
    _export(output, 2)
    engines.fail[2] = ImportError("cannot import name 'LlamaForCausalLM'")  # not one of the errors expected
    with caplog.at_level(logging.ERROR, logger=follower_module.__name__):
        assert follower.check() is None
        assert follower.check() is None  # not tried again every poll
    assert _served(follower) == 1 and engines.calls == 2
    (failed,) = [r for r in caplog.records if "does not load" in r.getMessage()]
    assert "ImportError" in failed.getMessage() and "serving step 1 until export.json changes" in failed.getMessage()
    assert [p.name for p in follower.snapshots.iterdir()] == ["export-0"]  # step 2's snapshot went

    _export(output, 3)
    assert follower.check() == 3 and _served(follower) == 3


def test_a_model_process_that_died_is_loaded_again_after_a_back_off_until_it_loads(following, monkeypatch, caplog):
    """The model process dies (a CUDA error, the OOM killer) and the load after it fails too (its memory not yet
    freed): the follower tries again, each wait twice as long, instead of answering 503 until the next export."""
    follower, engines, output = following
    _export(output, 1)
    assert follower.check() == 1
    now = 1000.0
    monkeypatch.setattr(follower_module.time, "monotonic", lambda: now)
    engines.made[0].is_dead = True
    engines.fail[1] = RuntimeError("CUDA error: out of memory")
    with caplog.at_level(logging.WARNING, logger=follower_module.__name__):
        assert follower.check() is None  # the load after the death: fails
        assert follower.check() is None  # backing off (2 polls): not tried
        assert engines.calls == 2
        now += 0.03
        assert follower.check() is None and engines.calls == 3  # tried again, fails again
        now += 0.03
        assert follower.check() is None and engines.calls == 3  # the next wait is twice as long (4 polls)
    failed = [r.getMessage() for r in caplog.records if "does not load" in r.getMessage()]
    assert failed[0].endswith("serving nothing (the model process of step 1 died) for 0.02 s, then again")
    del engines.fail[1]
    now += 0.02
    assert follower.check() == 1 and follower.models.current is engines.made[-1] and len(engines.made) == 2


def test_the_polling_thread_outlives_any_error(following, monkeypatch, caplog):
    follower, engines, output = following
    polled = threading.Event()

    def broken() -> None:
        polled.set()
        raise KeyError("a bug")

    monkeypatch.setattr(follower, "check", broken)
    with caplog.at_level(logging.ERROR, logger=follower_module.__name__):
        follower.start()
        assert polled.wait(30)
        polled.clear()
        assert polled.wait(30)  # polled again after the error
    follower.close()
    assert any("KeyError" in (r.exc_text or "") for r in caplog.records)


def test_a_marker_left_by_a_failed_install_is_logged_once(following, caplog):
    follower, engines, output = following
    _export(output, 1)
    (output / PUBLISHING).touch()
    with caplog.at_level(logging.WARNING, logger=follower_module.__name__):
        for _ in range(2 * MARKER_POLLS):
            assert follower.check() is None
    assert [r.getMessage() for r in caplog.records if PUBLISHING in r.getMessage()] == [
        f"{output / PUBLISHING} has been there for {MARKER_POLLS} polls: an install that failed part-way? "
        "Serving nothing until the next export"
    ]
    assert engines.calls == 0 and list(follower.snapshots.iterdir()) == []
    (output / PUBLISHING).unlink()
    assert follower.check() == 1


def test_a_snapshot_that_cannot_be_written_is_logged_once_and_tried_after_a_back_off(following, monkeypatch, caplog):
    follower, engines, output = following
    _export(output, 1)
    tries = []
    snapshot = follower_module.snapshot_export

    def disk_full(root, dest):
        tries.append(dest)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(follower_module, "snapshot_export", disk_full)
    monkeypatch.setattr(follower_module.time, "monotonic", lambda: now)
    now = 1000.0
    with caplog.at_level(logging.ERROR, logger=follower_module.__name__):
        assert follower.check() is None
        assert follower.check() is None  # backing off: not tried
        now += 0.03  # past the first back-off (2 polls)
        assert follower.check() is None
        assert follower.check() is None
    assert len(tries) == 2
    assert [r.getMessage() for r in caplog.records if "cannot snapshot" in r.getMessage()] == [
        f"cannot snapshot the export of {output} into {follower.snapshots} ([Errno 28] No space left on device): "
        "tried again after a back-off, up to 300 s"
    ]
    monkeypatch.setattr(follower_module, "snapshot_export", snapshot)
    now += 1
    assert follower.check() == 1


def test_removing_the_export_leaves_no_model_served(following):
    follower, engines, output = following
    _export(output, 1)
    assert follower.check() == 1
    checkpoints.roll_back(output, 0)  # the rollback to step 0: the export removed under the marker
    assert not (output / "export.json").exists()
    assert follower.check() is None and _served(follower) is None
    with pytest.raises(HTTPException) as refused:
        follower.models.get_engine("current_model")
    assert refused.value.status_code == 503
    assert follower.models.list_models()[0]["status"] == {"value": "unloaded"}
    follower.check()
    assert engines.made[0].stopped and list(follower.snapshots.iterdir()) == []
    _export(output, 2)
    assert follower.check() == 2


def test_an_export_loaded_after_close_is_stopped_not_swapped_in(following):
    follower, engines, output = following
    loading, release = threading.Event(), threading.Event()
    make = engines.__call__

    def slow(*args):
        loading.set()
        release.wait(30)
        return make(*args)

    follower.engine = slow
    _export(output, 1)
    follower.start()
    assert loading.wait(30)
    follower.close(timeout=0.01)  # the server stops while the export is still loading
    release.set()
    follower._thread.join(30)
    (engine,) = engines.made
    assert engine.stopped and follower.models.current is None
    assert list(follower.snapshots.iterdir()) == []


def test_the_work_folder_replaces_those_older_servers_left_by_process_id(tmp_path):
    """An older server named its folder by process id alone: one whose id no process has here goes, as does one of
    this process's id (an earlier process's); one of a running process stays."""
    output = tmp_path / "current_model"
    output.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for pid in (gone.pid, os.getppid(), os.getpid()):
        (output / f".serving-{pid}").mkdir()
        (output / f".serving-{pid}" / "export-0").mkdir()
    folder = work_dir(output)
    assert folder.parent == output and folder.name.startswith(".serving-") and list(folder.iterdir()) == []
    assert not (output / f".serving-{gone.pid}").exists()  # its server is gone
    assert not (output / f".serving-{os.getpid()}").exists()  # this id's: an earlier process's
    assert (output / f".serving-{os.getppid()}" / "export-0").exists()  # a server still running


def test_a_server_in_another_container_or_host_keeps_its_folder_and_a_gone_ones_goes(tmp_path):
    """Folders named by process id alone were removed when that id was not running here: a server in another PID
    namespace (a container) or on another host sharing the folder lost its snapshots, and two servers with the same
    id shared one. Each folder is now held by a lock: one nobody holds goes, a held one stays, whoever holds it."""
    from filelock import FileLock

    from daemon.serving.follower import release_work_dir

    output = tmp_path / "current_model"
    output.mkdir()
    live, gone = output / ".serving-other_host-1-0123abcd", output / ".serving-other_host-1-4567cdef"
    for folder in (live, gone):
        (folder / "export-0").mkdir(parents=True)
    held = FileLock(live.with_name(f"{live.name}.lock"))
    held.acquire()  # as the other server holds it for its lifetime
    (output / ".serving-crashed-7-89abcdef.lock").touch()  # killed between its lock and its folder
    first, second = work_dir(output), work_dir(output)  # two servers of one process id: two folders
    assert first != second and first.name.startswith(".serving-") and first.is_dir() and second.is_dir()
    assert (live / "export-0").exists()  # its lock is held: that server still runs
    assert not gone.exists() and not (output / ".serving-crashed-7-89abcdef.lock").exists()
    release_work_dir(first)
    assert not first.exists() and not first.with_name(f"{first.name}.lock").exists() and second.exists()
    held.release()
    third = work_dir(output)
    assert not live.exists() and second.exists()  # the other server is gone now; this process's second still held
    for folder in (second, third):
        release_work_dir(folder)
    assert list(output.iterdir()) == []  # every folder and lock gone with its server


def test_a_request_while_the_first_export_loads_is_told_so_with_retry_after(following):
    """A request sent as the server starts got 'no export ... is loaded (none yet, or removed)' while SmolLM2's
    export was loading (about 5 s): the reason was wrong, and nothing said when to come back."""
    follower, engines, output = following
    _export(output, 1)
    during: list[HTTPException] = []
    make = engines.__call__

    def loading(*args):
        with pytest.raises(HTTPException) as refused:
            follower.models.get_engine("current_model")
        during.append(refused.value)
        return make(*args)

    follower.engine = loading
    assert follower.check() == 1
    assert during[0].status_code == 503 and "(step 1) is loading" in during[0].detail
    assert during[0].headers == {"Retry-After": "5"}
    assert follower.models.get_engine("current_model").global_step == 1  # served once loaded
    checkpoints.roll_back(output, 0)
    follower.check()
    with pytest.raises(HTTPException) as refused:
        follower.models.get_engine("current_model")
    assert "none yet, or removed" in refused.value.detail and not refused.value.headers  # not loading: removed
