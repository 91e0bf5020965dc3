"""Supervision of the training child process: spawn, prestart, stall detection, stop, kill.

Each file trains in a child process that runs the same code path as
``python train.py --dataset`` (``python -m daemon train ...``, behind
``--launcher`` such as ``torchrun`` if given). :class:`ProcessSupervisor` runs one
such process at a time for the daemon loop (:mod:`daemon.service.watcher`) and reports how
it ended as a :class:`ChildResult`; what the exit means for the file (retry, fail,
file away) is the loop's business, and this module knows nothing of the ledger or
the inbox's folders.

- **Process groups.** Every child starts in a session of its own: a Ctrl-C in the
  terminal reaches only the daemon, which forwards one SIGTERM, and a kill takes
  the launcher with every process it started.
- **Prestart** (``--prestart``). While the inbox is idle a spare
  ``python -m daemon train-spare`` does its imports (torch, transformers: seconds)
  and waits for its flags on stdin; the next file trains in it.
- **Stall detection** (``--stall_timeout``). The child's heartbeat writes
  ``progress_at`` (a stamp of its last progress) into the status file. The daemon
  never compares that stamp with its own clock: it notes, on ``time.monotonic()``,
  when it last saw the stamp *change*, so a wall-clock step (NTP, a resumed VM) can
  neither kill a working child nor hide a hung one. A child whose stamp has not
  changed for that long is killed with its group and reported ``stalled``.
- **Reasons** (:mod:`daemon.store.failures`). A child that fails leaves its reason (the
  exception's type and first line) in ``status/.training-failure.json``; the file is
  removed before each attempt and read after it, into :attr:`ChildResult.reason`.
- **Stopping** (docs/guarantees.md, "Stopping"). When the daemon's stop
  event is set the child gets one SIGTERM (it checkpoints and exits), then SIGKILL
  after ``--stop_grace_seconds``.

Standard library and :mod:`daemon.store.status` only: the daemon process never imports torch.
Folder locks are in :mod:`daemon.store.locks`.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from daemon.config import SUPERVISOR_ENV, SUPERVISOR_HOST_ENV
from daemon.store.failures import FAILURE_FILE, FAILURE_FILE_ENV, clear_reason, take_reason
from daemon.store.records import RunState
from daemon.store.status import StatusFile

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
REPORT_TIMEOUT_SECONDS = 120.0


@dataclass
class ChildResult:
    """How a training child ended: its exit code, or that the daemon killed it for stalling.

    Attributes:
        returncode: the child's exit status (negative: the signal that ended it).
        stalled: True when it was killed for making no progress for ``stall_timeout``.
        reason: why it failed, as the child said (:func:`daemon.store.failures.describe`); None when
            it said nothing (it succeeded, was killed, or died before it could).
    """

    returncode: int
    stalled: bool = False
    reason: str | None = None

    def describe(self) -> str:
        """How the process ended, for a log line or the ledger: ``exited with code 1``, ``killed by SIGKILL``."""
        if self.stalled:
            return "stalled (no progress)"
        if self.returncode < 0:
            try:
                return f"killed by {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"killed by signal {-self.returncode}"
        return f"exited with code {self.returncode}"


class Supervisor(Protocol):
    """What the daemon loop needs of the training processes (a fake in the tests)."""

    def run(
        self, train_args: list[str], stop: threading.Event, on_poll: Callable[[], None] | None = None
    ) -> ChildResult:
        """Train with ``train_args`` in a child and wait for its end (see :meth:`ProcessSupervisor.run`)."""
        ...

    def start_spare(self, line_argv: list[str] | None = None) -> None:
        """Start the next training process ahead of time, if configured and none waits yet (see
        :meth:`ProcessSupervisor.start_spare`)."""
        ...

    def stop_spare(self) -> None:
        """Kill the waiting spare process, if any."""
        ...

    def refresh_report(self) -> None:
        """Rewrite ``status/report.html`` in the background (after a file is filed away)."""
        ...

    def wait_report(self) -> None:
        """Wait for the background report, if one is being written."""
        ...

    def kill_all(self) -> None:
        """SIGKILL the running child and the spare with their process groups (a second signal)."""
        ...


class ProcessSupervisor:
    """Runs ``python -m daemon train`` children one at a time and watches them.

    Args:
        status: the status file whose ``progress_at`` the children's heartbeat writes.
        launcher: command prefix for the child (``torchrun --nproc_per_node 2``); None for this Python.
        prestart: keep a spare training process started while idle (not with a ``launcher``).
        stall_timeout: seconds without progress before a child is killed.
        stop_grace_seconds: after the SIGTERM of a stop, seconds before SIGKILL.
        poll_seconds: how often a running child is checked.
    """

    def __init__(
        self,
        status: StatusFile,
        *,
        launcher: str | None = None,
        prestart: bool = False,
        stall_timeout: float = 600.0,
        stop_grace_seconds: float = 120.0,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.status = status
        self.launcher = launcher
        self.prestart = prestart
        self.stall_timeout = stall_timeout
        self.stop_grace_seconds = stop_grace_seconds
        self.poll_seconds = poll_seconds
        self._child: subprocess.Popen[bytes] | None = None
        self._spare: subprocess.Popen[bytes] | None = None
        self._spare_line_work = False  # the waiting spare was given the line's flags (start_spare)
        self._line_work_failed = False  # a spare given them ended while idle: later ones are not
        self._report: subprocess.Popen[bytes] | None = None

    def run(
        self, train_args: list[str], stop: threading.Event, on_poll: Callable[[], None] | None = None
    ) -> ChildResult:
        """Run one training attempt to its end.

        Args:
            train_args: the flags after ``python -m daemon train``.
            stop: the daemon's stop request; once set, the child gets SIGTERM, and
                SIGKILL after the grace period.
            on_poll: called every ``poll_seconds`` while the child runs.

        Returns:
            The child's exit code and the reason it left, or ``stalled`` when it was killed for
            making no progress (its state ``stalled`` is then in the status file).

        Raises:
            OSError: the reason left by an earlier attempt cannot be removed (the status folder is not writable).
        """
        progress = ProgressWatch(self.status, self.stall_timeout)  # before the spawn: the old stamp is not progress
        clear_reason(self._failure_file)
        self._child = child = self._spawn(train_args)
        term_sent: float | None = None
        try:
            while True:
                try:
                    code = child.wait(timeout=self.poll_seconds)
                    return ChildResult(code, reason=take_reason(self._failure_file) if code else None)
                except subprocess.TimeoutExpired:
                    pass
                if on_poll is not None:
                    on_poll()
                if stop.is_set():
                    if term_sent is None:
                        term_sent = time.monotonic()
                        _signal_group(child, signal.SIGTERM)
                    elif time.monotonic() - term_sent > self.stop_grace_seconds:
                        logger.error("the training process did not stop within the grace period: killing it")
                        _signal_group(child, signal.SIGKILL)
                elif progress.stalled():
                    logger.error("no training progress for %.0f s: killing the training process", self.stall_timeout)
                    self.status.update(state=RunState.STALLED)
                    _signal_group(child, signal.SIGKILL)
                    child.wait()
                    return ChildResult(child.returncode, stalled=True)
        finally:
            self._child = None

    @property
    def _failure_file(self) -> Path:
        return self.status.dir / FAILURE_FILE

    def _child_env(self) -> dict[str, str]:
        # SUPERVISOR_ENV: a child whose daemon is gone kills its own group (training._exit_with_supervisor).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", SUPERVISOR_ENV: str(os.getpid())}
        env[SUPERVISOR_HOST_ENV] = socket.gethostname()  # ranks on other machines (multi-node) cannot see the pid
        return {**env, FAILURE_FILE_ENV: str(self._failure_file.absolute())}

    def _spawn(self, train_args: list[str]) -> subprocess.Popen[bytes]:
        """The training process for ``train_args``: the prestarted one if it is alive, else a new one."""
        spare, self._spare = self._spare, None
        if spare is not None and spare.poll() is None and spare.stdin is not None:
            try:
                spare.stdin.write(json.dumps(train_args).encode() + b"\n")
                spare.stdin.close()
                logger.info("training in the prestarted process %d", spare.pid)
                return spare
            except BrokenPipeError:  # it died between the check and the write
                spare.wait()
        prefix = shlex.split(self.launcher) if self.launcher else [sys.executable]
        return subprocess.Popen(
            [*prefix, "-m", "daemon", "train", *train_args], env=self._child_env(), start_new_session=True
        )

    def start_spare(self, line_argv: list[str] | None = None) -> None:
        """Start the next training process ahead (``--prestart``): its imports run while the inbox is idle.

        ``python -m daemon train-spare`` imports torch, transformers and datasets (seconds: the
        largest share of a training process's start-up), then waits for its flags on stdin. Not
        with ``--launcher``, which starts processes of its own. Does nothing while a spare is alive.

        Args:
            line_argv: the line's flags (folders and training flags), given only while no file trains:
                with them the spare first keeps a pretrained line's base-model answers
                (:func:`daemon.training.prepare.prepare_idle_line`), work the line's first file would
                otherwise do after its drop. Not given while a child trains: the spare would take CPU from it.
                Once a spare given them has ended while idle (its work failed, or it was killed for its
                memory), later ones are not given them: that work is left to the first file's own run.
        """
        if not self.prestart or self.launcher or (self._spare is not None and self._spare.poll() is None):
            return
        if self._spare is not None and self._spare_line_work:  # it ended before a file came: its line work failed
            logger.warning(
                "the prestarted process ended while idle (exit %s): later ones only import", self._spare.returncode
            )
            self._line_work_failed = True
        self._spare_line_work = bool(line_argv) and not self._line_work_failed
        self._spare = subprocess.Popen(
            [sys.executable, "-m", "daemon", "train-spare", *((line_argv or []) if self._spare_line_work else [])],
            env=self._child_env(),
            stdin=subprocess.PIPE,
            start_new_session=True,
        )

    def stop_spare(self) -> None:
        """Kill the waiting prestarted process (it holds no state: nothing to save) and reap it."""
        spare, self._spare = self._spare, None
        if spare is not None:
            _signal_group(spare, signal.SIGKILL)
            spare.wait()
            if spare.stdin is not None:
                spare.stdin.close()

    def refresh_report(self) -> None:
        """Start ``python -m daemon report`` at ``nice`` 10 for this status folder, after the previous one ends.

        The report (matplotlib: seconds of CPU) is drawn here rather than by the training
        process, so that the next file's start-up and training do not wait for it; at a lower
        priority it takes what training leaves of the CPU. Its errors go to the daemon's log.
        """
        self.wait_report()
        nice = shutil.which("nice")
        command = [sys.executable, "-m", "daemon", "report", "--status_dir", str(self.status.dir)]
        self._report = subprocess.Popen(
            [nice, "-n", "10", *command] if nice else command,
            env=self._child_env(),
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_report(self, timeout: float = REPORT_TIMEOUT_SECONDS) -> None:
        """Wait for the background report (killed after ``timeout`` seconds: a hung plot never holds the daemon)."""
        report, self._report = self._report, None
        if report is None:
            return
        try:
            report.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.error("the report took over %.0f s: killed", timeout)
            _signal_group(report, signal.SIGKILL)
            report.wait()

    def kill_all(self) -> None:
        """SIGKILL the running child, the spare and the report with their process groups, without waiting.

        For a second stop signal, right before the daemon exits: safe to call from a signal handler.
        """
        for process in (self._child, self._spare, self._report):
            if process is not None:
                _signal_group(process, signal.SIGKILL)


class ProgressWatch:
    """Stall detection on the daemon's monotonic clock: how long since ``progress_at`` last changed.

    The stamp is only compared with its previous value, never with ``time.time()``, so
    a wall-clock step in either direction changes nothing. Build one just before the
    child starts: the stamp left by an earlier child is the baseline, not progress.

    Args:
        status: the status file the child's heartbeat writes.
        timeout: seconds of monotonic time without a change before :meth:`stalled` is True.
    """

    def __init__(self, status: StatusFile, timeout: float) -> None:
        self.status = status
        self.timeout = timeout
        self._seen = self._stamp()
        self._changed_at = time.monotonic()

    def _stamp(self) -> object:
        return self.status.read().get("progress_at")

    def stalled(self) -> bool:
        """Read the stamp; True when it has not changed for ``timeout`` seconds.

        Returns:
            Whether the child counts as stalled now.
        """
        stamp, now = self._stamp(), time.monotonic()
        if stamp is not None and stamp != self._seen:
            self._seen, self._changed_at = stamp, now
        return now - self._changed_at > self.timeout


def _signal_group(child: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(child.pid, sig)
    except ProcessLookupError:
        pass
