"""Supervision of the training child process: spawn, prestart, stall detection, stop, kill.

Each file trains in a child process that runs the same code path as
``python train.py --dataset`` (``python -m daemon train ...``, behind
``--launcher`` such as ``torchrun`` if given). :class:`ProcessSupervisor` runs one
such process at a time for the daemon loop (:mod:`daemon.watcher`) and reports how
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
- **Folder locks** (:func:`lock_folders`). A daemon holds a ``flock`` on
  ``.daemon.lock`` in its output and status folders and on its inbox folder itself,
  and a training run on its output and status folders, so no two of them share a
  ledger, snapshots, ``processing/`` or checkpoints. The kernel drops a flock when
  its holder dies. A daemon's training child does not wait for its daemon's locks.
- **Stopping** (README "Operating the daemon", "Stopping"). When the daemon's stop
  event is set the child gets one SIGTERM (it checkpoints and exits), then SIGKILL
  after ``--stop_grace_seconds``.

Standard library, ``filelock`` and :mod:`daemon.status` only: the daemon process never imports torch.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from filelock import FileLock, Timeout

from daemon.config import SUPERVISOR_ENV
from daemon.exceptions import DaemonError
from daemon.records import RunState
from daemon.status import StatusFile

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
LOCK_FILE = ".daemon.lock"
# Who else holds a busy folder's lock, by the folder's role; the output folder's message is the README's.
_BUSY = {
    "inbox": "another daemon is already watching the inbox {folder} (the folder is locked)",
    "status": "another daemon is already reporting into {folder}, or a train.py is ({lock} is locked)",
    "output": "another daemon is already training {folder}, or a train.py is ({lock} is locked)",
}


class FolderBusy(DaemonError):
    """A folder this process must own is locked by another daemon or ``train.py``."""


@dataclass
class ChildResult:
    """How a training child ended: its exit code, or that the daemon killed it for stalling.

    Attributes:
        returncode: the child's exit status (negative: the signal that ended it).
        stalled: True when it was killed for making no progress for ``stall_timeout``.
    """

    returncode: int
    stalled: bool = False


class Supervisor(Protocol):
    """What the daemon loop needs of the training processes (a fake in the tests)."""

    def run(
        self, train_args: list[str], stop: threading.Event, on_poll: Callable[[], None] | None = None
    ) -> ChildResult:
        """Train with ``train_args`` in a child and wait for its end (see :meth:`ProcessSupervisor.run`)."""
        ...

    def start_spare(self) -> None:
        """Start the next training process ahead of time, if configured and none waits yet."""
        ...

    def stop_spare(self) -> None:
        """Kill the waiting spare process, if any."""
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
            The child's exit code, or ``stalled`` when it was killed for making no progress
            (its state ``stalled`` is then in the status file).
        """
        progress = ProgressWatch(self.status, self.stall_timeout)  # before the spawn: the old stamp is not progress
        self._child = child = self._spawn(train_args)
        term_sent: float | None = None
        try:
            while True:
                try:
                    return ChildResult(child.wait(timeout=self.poll_seconds))
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

    def _child_env(self) -> dict[str, str]:
        # SUPERVISOR_ENV: a child whose daemon is gone kills its own group (training._exit_with_supervisor).
        return {**os.environ, "PYTHONUNBUFFERED": "1", SUPERVISOR_ENV: str(os.getpid())}

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

    def start_spare(self) -> None:
        """Start the next training process ahead (``--prestart``): its imports run while the inbox is idle.

        ``python -m daemon train-spare`` imports torch, transformers and datasets (about 4 s on
        2 cores), then waits for its flags on stdin. Not with ``--launcher``, which starts
        processes of its own. Does nothing while a spare is alive.
        """
        if not self.prestart or self.launcher or (self._spare is not None and self._spare.poll() is None):
            return
        self._spare = subprocess.Popen(
            [sys.executable, "-m", "daemon", "train-spare"],
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

    def kill_all(self) -> None:
        """SIGKILL the running child and the spare with their process groups, without waiting.

        For a second stop signal, right before the daemon exits: safe to call from a signal handler.
        """
        for process in (self._child, self._spare):
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


class FolderLock(Protocol):
    """A held folder lock: a ``filelock.FileLock`` or a flock on the folder itself."""

    def release(self) -> None:
        """Give the lock back."""
        ...


class _DirectoryFlock:
    """A ``flock`` on a folder itself, which adds nothing to it: for the inbox, which holds only the user's files.

    Raises:
        BlockingIOError: another process holds it.
        OSError: the filesystem cannot lock a folder (some network filesystems).
    """

    def __init__(self, folder: Path) -> None:
        self._fd: int | None = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(self._fd)
            raise

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor of the open file drops its flock
            self._fd = None


class _Unlocked:
    """Stands for an inbox lock the filesystem could not take."""

    def release(self) -> None:
        pass


def _take(role: str, folder: Path) -> FolderLock | None:
    """The lock of one folder, or None when another process holds it."""
    if role == "inbox":
        try:
            return _DirectoryFlock(folder)
        except BlockingIOError:
            return None
        except OSError as e:  # not worth refusing to start: the inbox had no lock before
            logger.warning("cannot lock the inbox %s on this filesystem (%s): run one daemon per inbox", folder, e)
            return _Unlocked()
    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def lock_folders(folders: list[tuple[str, str]], *, trust_supervisor: bool = False) -> list[FolderLock]:
    """Lock each folder without waiting: ``<folder>/.daemon.lock`` (``filelock``), the inbox folder itself.

    The inbox gets a ``flock`` on the folder, so that nothing but the user's files is ever in it.

    Args:
        folders: ``(role, folder)`` pairs; role ``inbox``, ``status`` or ``output`` (names the
            folder in the error). Missing folders are created; a folder named twice is locked once.
        trust_supervisor: this is a daemon's training child: a folder whose lock is held is
            taken to be held by that daemon (which never lets two children run), not refused.

    Returns:
        The locks taken; pass them to :func:`release_folders`.

    Raises:
        FolderBusy: one line naming the first folder another process holds (nothing is held then).
    """
    locks: list[FolderLock] = []
    seen: set[Path] = set()
    try:
        for role, name in folders:
            folder = Path(name)
            folder.mkdir(parents=True, exist_ok=True)
            if folder.resolve() in seen:
                continue
            seen.add(folder.resolve())
            lock = _take(role, folder)
            if lock is not None:
                locks.append(lock)
            elif trust_supervisor:
                logger.debug("%s is locked by the daemon that started this process", folder)
            else:
                raise FolderBusy(_BUSY[role].format(folder=folder, lock=folder / LOCK_FILE))
    except BaseException:
        release_folders(locks)
        raise
    return locks


def release_folders(locks: list[FolderLock]) -> None:
    """Release the locks of :func:`lock_folders` (the kernel also does when the process ends)."""
    for lock in reversed(locks):
        lock.release()
