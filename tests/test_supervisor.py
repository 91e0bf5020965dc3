"""The training-process supervisor: exit codes, stall kills, stop forwarding, the prestarted spare.

The children here are a small Python script behind ``--launcher`` (as a launcher
such as torchrun would be), so no test imports torch; each takes a second or two.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import psutil
import pytest
from helpers import wait_for

from daemon.config import SUPERVISOR_ENV
from daemon.service.supervisor import ChildResult, ProcessSupervisor
from daemon.store.failures import FAILURE_FILE
from daemon.store.status import StatusFile

# Started as ``<launcher> -m daemon train --mode MODE --out FOLDER --status_dir FOLDER``.
CHILD = r"""
import json, os, signal, subprocess, sys, time
args = sys.argv[1:]
flags = dict(zip(args[3::2], args[4::2]))
mode, out = flags["--mode"], flags["--out"]
started = {"argv": args, "supervisor": os.environ.get("SUPERVISOR_ENV_NAME"), "grandchild": None}
if mode == "hang":  # a launcher that started a worker, then hangs
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started["grandchild"] = worker.pid
if mode == "term":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))  # checkpoint and stop, as training does
if mode == "ignore_term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(os.path.join(out, ".started.json"), "w") as f:
    json.dump(started, f)
os.rename(os.path.join(out, ".started.json"), os.path.join(out, "started.json"))
if mode == "exit7":
    sys.exit(7)
if mode == "raise":  # what daemon.training.cli.main does with an exception before it exits 1
    from daemon.store.failures import leave_reason
    leave_reason(RuntimeError("the tokenizer exploded\n  on its second line, a detail"))
    sys.exit(1)
if mode in ("progress", "progress_then_hang"):  # the heartbeat of a slow but healthy run
    from daemon.store.status import StatusFile
    status = StatusFile(flags["--status_dir"])
    offset = float(flags.get("--offset", 0))  # the child's clock stepped by this much
    for _ in range(20 if mode == "progress" else 1):
        status.update(progress_at=time.time() + offset)
        time.sleep(0.1)
    if mode == "progress":
        sys.exit(0)
    time.sleep(4)  # hung, heartbeat stamp frozen: a stall unless the stamp is misread
    sys.exit(0)
time.sleep(60)
""".replace("SUPERVISOR_ENV_NAME", SUPERVISOR_ENV)


@pytest.fixture
def launcher(tmp_path: Path) -> str:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return f"{sys.executable} {script}"


def _supervisor(tmp_path: Path, launcher: str | None, **options: object) -> ProcessSupervisor:
    options = {"stall_timeout": 30.0, "stop_grace_seconds": 30.0, "poll_seconds": 0.05, **options}
    return ProcessSupervisor(StatusFile(tmp_path / "status"), launcher=launcher, **options)


def _run(
    supervisor: ProcessSupervisor,
    tmp_path: Path,
    mode: str,
    stop: threading.Event | None = None,
    on_poll=None,
    offset: float = 0.0,
):
    train_args = ["--mode", mode, "--out", str(tmp_path), "--status_dir", str(tmp_path / "status")]
    train_args += ["--offset", str(offset)]
    return supervisor.run(train_args, stop or threading.Event(), on_poll)


def _started(tmp_path: Path) -> dict:
    path = tmp_path / "started.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_the_child_runs_daemon_train_behind_the_launcher_and_its_exit_code_is_reported(tmp_path, launcher):
    result = _run(_supervisor(tmp_path, launcher), tmp_path, "exit7")
    assert result == ChildResult(7, stalled=False)
    started = _started(tmp_path)
    assert started["argv"][:5] == ["-m", "daemon", "train", "--mode", "exit7"]
    assert started["supervisor"] == str(os.getpid())  # so that the child dies with its daemon


def test_a_child_that_raises_reports_the_exceptions_type_and_first_line(tmp_path, launcher):
    supervisor = _supervisor(tmp_path, launcher)
    result = _run(supervisor, tmp_path, "raise")
    assert result == ChildResult(1, reason="RuntimeError: the tokenizer exploded")
    assert not (tmp_path / "status" / FAILURE_FILE).exists()  # taken: the next attempt starts without it


def test_a_reason_left_by_an_earlier_attempt_is_never_taken_for_a_later_ones(tmp_path, launcher):
    supervisor = _supervisor(tmp_path, launcher)
    (tmp_path / "status" / FAILURE_FILE).write_text('{"reason": "RuntimeError: an old one"}\n')
    assert _run(supervisor, tmp_path, "exit7") == ChildResult(7, reason=None)


def test_how_a_child_ended_reads_as_words():
    assert ChildResult(1).describe() == "exited with code 1"
    assert ChildResult(-9).describe() == "killed by SIGKILL"
    assert ChildResult(-9, stalled=True).describe() == "stalled (no progress)"


def test_a_child_without_progress_is_killed_with_its_process_group_and_reported_stalled(tmp_path, launcher):
    supervisor = _supervisor(tmp_path, launcher, stall_timeout=1.5)
    result = _run(supervisor, tmp_path, "hang")
    assert result.stalled and result.returncode == -9
    assert supervisor.status.read()["state"] == "stalled"
    worker = _started(tmp_path)["grandchild"]
    wait_for(lambda: not _alive(worker), timeout=5, what="the launcher's worker to be killed too")


def test_progress_in_the_status_file_keeps_a_slow_child_alive(tmp_path, launcher):
    result = _run(_supervisor(tmp_path, launcher, stall_timeout=1.0), tmp_path, "progress")
    assert result == ChildResult(0, stalled=False)


@pytest.mark.parametrize("offset", [-3600.0, 3600.0], ids=["clock-behind", "clock-ahead"])
def test_progress_stamps_far_from_the_daemons_clock_keep_a_changing_child_alive(tmp_path, launcher, offset):
    # A clock step (NTP, a VM resume) moves time.time(); only a *change* of progress_at counts as progress.
    result = _run(_supervisor(tmp_path, launcher, stall_timeout=1.0), tmp_path, "progress", offset=offset)
    assert result == ChildResult(0, stalled=False)


@pytest.mark.parametrize("offset", [0.0, 3600.0], ids=["same-clock", "clock-ahead"])
def test_a_child_whose_progress_stamp_stops_changing_is_killed_whatever_the_stamp_says(tmp_path, launcher, offset):
    supervisor = _supervisor(tmp_path, launcher, stall_timeout=1.0)
    result = _run(supervisor, tmp_path, "progress_then_hang", offset=offset)
    assert result.stalled and result.returncode == -9


def test_a_stop_request_forwards_sigterm_and_the_child_stops_on_its_own(tmp_path, launcher):
    stop = threading.Event()

    def on_poll() -> None:  # the daemon's signal arrives once the child has set up its handler
        if _started(tmp_path):
            stop.set()

    result = _run(_supervisor(tmp_path, launcher), tmp_path, "term", stop, on_poll)
    assert result == ChildResult(3, stalled=False)  # its own exit code, not a kill


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path, launcher):
    stop = threading.Event()
    supervisor = _supervisor(tmp_path, launcher, stop_grace_seconds=0.3)
    result = _run(supervisor, tmp_path, "ignore_term", stop, lambda: _started(tmp_path) and stop.set())
    assert result == ChildResult(-9, stalled=False)


def test_the_spare_is_started_once_and_stopped_and_never_with_a_launcher(tmp_path, launcher):
    _supervisor(tmp_path, launcher, prestart=True).start_spare()
    assert _spares() == []  # a launcher starts processes of its own
    supervisor = _supervisor(tmp_path, None, prestart=True)
    supervisor.start_spare()
    supervisor.start_spare()
    assert len(_spares()) == 1
    supervisor.stop_spare()
    assert _spares() == []


def test_an_idle_spare_gets_the_lines_flags_until_one_ends_before_a_file_comes(tmp_path):
    supervisor = _supervisor(tmp_path, None, prestart=True)
    line = ["--output_dir", str(tmp_path / "model"), "--status_dir", str(tmp_path / "status")]
    supervisor.start_spare(line)
    (spare,) = _spares()
    assert _command_line(spare)[-4:] == line
    os.kill(spare.pid, signal.SIGKILL)  # as the kernel's OOM killer would, in the middle of its line work
    wait_for(lambda: not _alive(spare.pid), timeout=30, what="the spare to end")
    supervisor.start_spare(line)
    (again,) = _spares()
    assert (_command_line(again) or [])[-1] == "train-spare"  # it only imports: no loop of the same failing work
    supervisor.stop_spare()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _command_line(process: psutil.Process) -> list[str] | None:
    try:
        return process.cmdline()
    except psutil.NoSuchProcess:
        return None


def _spares() -> list[psutil.Process]:
    """This process's live children that are prestarted spares (``python -m daemon train-spare``).

    Waits for each child's exec first: between fork and exec a child's command line is still this
    process's, so a spare read too soon looked like no spare (seen once in ``make test``).
    """
    me = psutil.Process()
    mine, children = me.cmdline(), [p for p in me.children() if _alive(p.pid)]
    wait_for(lambda: all(_command_line(p) != mine for p in children), timeout=30, what="the children's exec")
    return [p for p in children if "train-spare" in (_command_line(p) or []) and _alive(p.pid)]
