"""The inbox daemon's loop and its per-file policy: decides *what* to train and *when*.

``python -m daemon`` (docs/operating.md) watches the drop zone
(:mod:`daemon.service.inbox`) with a watchdog observer, plus a start-up scan and a
periodic rescan, so files that arrived while it was down, or whose events were
missed, are not lost. Hostile entries are rejected into ``failed/`` unopened.
Files train one at a time, in arrival order, each in a training process run by
a :class:`~daemon.service.supervisor.Supervisor`. The policy, with the ledger
(:mod:`daemon.store.ledger`) as its memory:

- A file still in ``processing/`` (claimed before a stop or a crash) goes first.
- A claimed file whose ledger row is already ``done`` or ``failed`` (the child
  finished before a crash) is only filed away; it is not trained again.
- Content (sha256) already ``done`` is skipped into ``failed/`` with a note,
  unless ``--allow_duplicates``. A ledger row stops being a claim once its file
  is filed away: a file dropped again under the same name is a new claim.
- An entry that cannot be moved is rejected (one ledger row) and then left
  alone for a growing while; it blocks neither the loop nor the other files.
- A training process that crashes or stalls counts one attempt, and the file is
  retried (resuming at its latest checkpoint) up to ``--max_attempts``; then it
  fails with a history row. A process that fails on an exception leaves its reason
  (:mod:`daemon.store.failures`), which becomes the file's error; the same reason twice in
  a row fails the file at once.
- A stop request mid-file leaves the file claimed: the next start resumes it.
- A training process that runs out of disk space counts no attempt: the file stays claimed,
  the state is ``waiting_for_disk`` until the output folder has the room it needed, then the
  file resumes at its latest checkpoint.
- Before any file, done files whose last steps the latest usable checkpoint lacks are
  reopened and trained again (:mod:`daemon.store.reconcile`).

This module never touches model APIs and imports neither torch nor transformers'
model code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from daemon.config import LEDGER_ENV, DaemonArguments
from daemon.config_file import CONFIG_HELP, as_argv, read_flags, split_config
from daemon.exceptions import ConfigError, DaemonError
from daemon.names import printable
from daemon.service.entries import is_ignored_name, rejection_reason
from daemon.service.inbox import Candidate, Inbox
from daemon.service.supervisor import ChildResult, ProcessSupervisor, Supervisor
from daemon.store.checkpoints import fail_file, latest_complete_checkpoint, space_needed
from daemon.store.durable import EXIT_NO_SPACE, wait_for_room
from daemon.store.ledger import Entry, Ledger
from daemon.store.locks import lock_folders, release_folders
from daemon.store.reconcile import reconcile
from daemon.store.records import FileState, HistoryRow, RunState, utc_now
from daemon.store.rollback import finish_interrupted_rollback
from daemon.store.status import StatusFile

logger = logging.getLogger(__name__)

QUEUE_REFRESH_SECONDS = 2.0
DISK_POLL_SECONDS = 5.0  # at most, between two looks at the free space while waiting for disk
_BETWEEN_FILES = frozenset(state for state in RunState if state.between_files)


class _Wake(FileSystemEventHandler):
    """watchdog handler: an entry of the inbox that appears, goes or is finished wakes the loop; close events
    and renames into it are noted.

    Only what can change the loop's decision wakes it. Names being written (``.*``, ``*.tmp``, ``*.part``)
    never do: a download written in 64 KB pieces sends an event per piece. Nor do writes (a file written in
    place is complete once it settles, which the loop checks on its own clock, or once it is closed), opens
    and reads, or the inbox folder's own "modified" that comes with each of its entries' events.
    """

    # The events that wake it; also the observer's event_filter, so that inotify does not report the others.
    EVENTS = (
        FileCreatedEvent,
        DirCreatedEvent,
        FileMovedEvent,
        DirMovedEvent,
        FileDeletedEvent,
        DirDeletedEvent,
        FileClosedEvent,
    )

    def __init__(self, inbox: Inbox, wake: threading.Event) -> None:
        self.inbox = inbox
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if not isinstance(event, self.EVENTS):
            return
        paths = [Path(os.fsdecode(p)) for p in (event.src_path, event.dest_path) if p]
        if all(is_ignored_name(path.name) for path in paths):  # a rename from a .part name is news: its dest
            return
        if isinstance(event, FileClosedEvent) and not event.is_directory:
            self.inbox.note_closed(Path(os.fsdecode(event.src_path)))
        elif isinstance(event, FileMovedEvent) and event.dest_path and not event.is_directory:
            dest = Path(os.fsdecode(event.dest_path))
            if dest.parent == self.inbox.root:
                self.inbox.note_renamed(dest)
        self.wake.set()


def _observer() -> BaseObserver:
    """watchdog's observer for this system. On Linux, one that reports a file renamed into the inbox from
    another folder as a move (the default reports it as a creation, like a file opened there)."""
    if Observer.__module__ == "watchdog.observers.inotify":  # Linux: importable, since Observer is its class
        from watchdog.observers.inotify import InotifyObserver

        return InotifyObserver(generate_full_events=True)
    return Observer()


class Daemon:
    """The watch loop and the per-file policy. ``run()`` returns an exit code.

    Args:
        args: the daemon's options.
        train_argv: flags passed through to every training child.
        supervisor: runs the training processes; default a :class:`ProcessSupervisor`
            built from ``args`` (the tests pass a fake).
    """

    def __init__(self, args: DaemonArguments, train_argv: list[str], supervisor: Supervisor | None = None) -> None:
        self.args = args
        self.train_argv = train_argv
        self.inbox = Inbox(args.inbox_dir, args.settle_seconds)
        self.status = StatusFile(args.status_dir)
        self.ledger = Ledger(args.status_dir)
        if supervisor is None:
            supervisor = ProcessSupervisor(
                self.status,
                launcher=args.launcher,
                prestart=args.prestart,
                stall_timeout=args.stall_timeout,
                stop_grace_seconds=args.stop_grace_seconds,
            )
        self.supervisor = supervisor
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.processed = 0
        self._queue_published = 0.0
        self._queued = 0  # files waiting behind the one in training, as last published
        self._published: tuple[list[str], bool] | None = None  # (queue, between files) as last written

    def run(self) -> int:
        """Drain and watch the inbox until stopped (or drained, with ``--once``).

        Returns:
            The process exit code (0; a stop request also ends in 0).

        Raises:
            RollbackError: an interrupted rollback in the status folder is another output folder's.
        """
        finish_interrupted_rollback(self.args.output_dir, self.args.status_dir)  # before anything reads the model
        latest = latest_complete_checkpoint(self.args.output_dir, set_aside=False)
        step = latest.global_step if latest else 0
        self.status.update(state=RunState.IDLE, global_step=step, max_steps=step, current_file=None, disk=None)
        self.ledger.mark_filed_unless_claimed(p.name for p in self.inbox.claimed())
        observer = _observer()
        observer.schedule(
            _Wake(self.inbox, self.wake), str(self.inbox.root), recursive=False, event_filter=list(_Wake.EVENTS)
        )
        observer.start()
        try:
            self._reconcile()  # before any file: the next one starts where the done ones ended
            self._loop()
        finally:
            self.supervisor.stop_spare()
            self.supervisor.wait_report()
            observer.stop()
            observer.join()
            self.status.update(state=RunState.STOPPED if self.stop.is_set() else RunState.IDLE)
        return 0

    def _loop(self) -> None:
        while not self.stop.is_set():
            claimed = self.inbox.claimed()
            if claimed:  # a file claimed before a stop or crash goes first
                self._process(claimed[0])
                if self.args.max_files is not None and self.processed >= self.args.max_files:
                    return
                continue
            pending = self._reject_hostile(self.inbox.scan())
            self._publish_queue(pending)
            now = time.time()
            ready = [c for c in pending if self.inbox.is_complete(c, now)]
            if ready:
                with contextlib.suppress(OSError):  # gone, or held back for a while (logged)
                    self.inbox.claim(ready[0])
                continue
            if self.args.once and not pending:
                logger.info("inbox drained")
                return
            self.supervisor.start_spare()  # idle: the next training process does its imports now
            self._sleep(bool(pending))

    def _sleep(self, pending: bool) -> None:
        """Until an event, the next settle check, the next try of a held entry, or the periodic rescan."""
        timeout = min(self.args.settle_seconds / 4, self.args.rescan_seconds) if pending else self.args.rescan_seconds
        retry = self.inbox.next_retry_in()
        if retry is not None:
            timeout = min(timeout, retry)
        self.wake.wait(max(timeout, 0.05))
        self.wake.clear()

    def _reject_hostile(self, pending: list[Candidate]) -> list[Candidate]:
        kept = []
        for cand in pending:
            try:
                reason = rejection_reason(cand.path.lstat())
            except FileNotFoundError:
                continue
            if reason is None:
                kept.append(cand)
                continue
            self._reject(cand.path, reason)
        return kept

    def _reject(self, path: Path, reason: str) -> None:
        entry = self.ledger.find_claim(path.name, None)  # rejected before, but could not be moved then
        if entry is None:
            logger.error("rejected %s: %s", printable(path.name), printable(reason))
            entry = self.ledger.add(path.name, FileState.REJECTED, error=reason)
            self.status.update(last_error={"file": path.name, "message": f"rejected: {reason}", "at": utc_now()})
        self._file_away(path, entry, f"rejected without opening it: {reason}")

    def _file_away(self, path: Path, entry: Entry, error: str | None) -> Path | None:
        """Move a finished entry to ``done/`` or ``failed/`` and mark its row filed; None if it cannot be moved now."""
        target: Path | None = None
        try:
            target = self.inbox.finish(path, error)
        except FileNotFoundError:  # gone: nothing left to file away
            logger.warning("%s was gone before it could be filed away", printable(path.name))
        except OSError:  # logged by the inbox, which holds it back and tries again later
            return None
        self.ledger.mark_filed(entry.id)
        return target

    def _publish_queue(self, pending: list[Candidate], between_files: bool = True) -> None:
        """Show the files waiting in the status, rewriting it only when that changes what it shows.

        Args:
            pending: the files waiting, in arrival order.
            between_files: no training process runs now: a state it left (a crash's) is set to idle.
        """
        names = [c.path.name for c in pending]
        if self._published == (names, between_files):
            return  # as last written, and no training process has written the status since

        def mutate(doc: dict[str, Any]) -> None:
            doc["queue"] = names
            doc["files"]["queued"] = len(names)
            if between_files and doc["state"] not in _BETWEEN_FILES:
                doc["state"] = RunState.IDLE  # no child runs now: a crashed child's last state is stale

        self.status.update(mutate)
        self._published = (names, between_files)

    def _while_training(self) -> None:
        """Every poll while a child trains: show files dropped meanwhile (every ``QUEUE_REFRESH_SECONDS``),
        and prestart the next file's training process, so that a queue pays the start-up once.

        The spare's imports run on one core while the child does its own (docs/speed.md). With
        ``--once`` it is started only when another file waits: a last file needs none.
        """
        if time.monotonic() - self._queue_published > QUEUE_REFRESH_SECONDS:
            pending = self.inbox.scan()
            self._queued = len(pending)
            self._publish_queue(pending, between_files=False)
            self._queue_published = time.monotonic()
        if self._queued or not self.args.once:
            self.supervisor.start_spare()

    # ------------------------------------------------------------------ one claimed file

    def _process(self, claimed: Path) -> None:
        """Train a claimed file to its end (done, failed, or left claimed when the daemon stops)."""
        try:
            sha, size = self.inbox.sha256(claimed)
        except FileNotFoundError:
            return
        except OSError as e:
            self._reject(claimed, str(e))
            return
        self._reconcile()
        entry = self._claim_entry(claimed, sha, size)
        if entry is None:
            return
        entry = self._train_entry(claimed, entry)
        if entry.state.finished:  # the child's outcome, or one recorded before a crash and not yet filed away
            self._finish(claimed, entry, None if entry.state == FileState.DONE else entry.error)
        else:
            logger.warning("%s stopped mid-file; it resumes on the next start", printable(claimed.name))

    def _train_entry(self, path: Path, entry: Entry) -> Entry:
        """Train ``path`` for the ledger row ``entry`` until the row is finished or the daemon stops.

        A training process that exits for want of disk space (:data:`~daemon.store.durable.EXIT_NO_SPACE`)
        is waited for (:meth:`_wait_for_disk`) and run again, without counting an attempt.

        Returns:
            The row as the last attempt left it.
        """
        while not entry.state.finished and not self.stop.is_set():
            logger.info("training %s (attempt %d)", printable(path.name), entry.attempts + 1)
            self._queue_published = 0.0
            result = self.supervisor.run(self._train_args(path, entry.id), self.stop, self._while_training)
            self._published = None  # the training process wrote the status: its state, maybe stale now
            entry = self.ledger.get(entry.id) or entry
            if entry.state.finished or self.stop.is_set():
                break
            if result.returncode == EXIT_NO_SPACE and not result.stalled:
                self._wait_for_disk()
            else:
                entry = self._count_attempt(entry, result)
        return entry

    def _wait_for_disk(self) -> None:
        """Hold the claimed file, state ``waiting_for_disk``, until the output folder has the room its run needed.

        The training process left the bytes it needed in the status's ``disk``; with none there
        the daemon asks :func:`~daemon.store.checkpoints.space_needed` itself.
        """
        needed = (self.status.read().get("disk") or {}).get("needed_bytes")
        needed = int(needed or space_needed(self.args.output_dir, with_export=True))
        poll = min(self.args.rescan_seconds, DISK_POLL_SECONDS)
        wait_for_room(self.status, self.args.output_dir, needed, self.stop, poll, self._publish_waiting)

    def _publish_waiting(self) -> None:
        self._publish_queue(self.inbox.scan(), between_files=False)

    def _reconcile(self) -> None:
        """Train again the steps of done files that the latest usable checkpoint lacks (:mod:`daemon.store.reconcile`).

        Raises:
            CheckpointError: a reopened file's data is no longer in the inbox (nothing is changed).
        """
        for _ in reconcile(self.ledger, self.status, self.args.output_dir, self.inbox.root, self._train_entry):
            self.supervisor.refresh_report()
            if self.stop.is_set():
                return

    def _count_attempt(self, entry: Entry, result: ChildResult) -> Entry:
        """Count a failed attempt; the file fails after ``--max_attempts``, or at once when its reason repeats.

        A reason the child left (an exception) that is the same as the previous attempt's is
        deterministic: retrying it again would only fail again. A crash of the machine's kind
        (killed by a signal, stalled, dead before it could say why) is retried up to the limit.
        """
        how, reason = result.describe(), result.reason
        repeated = reason is not None and reason == entry.error
        entry = self.ledger.count_attempt(entry.id, reason or f"training process {how}")
        said = reason or "no reason left"
        logger.error("%s: attempt %d: training process %s: %s", printable(entry.name), entry.attempts, how, said)
        log = "its traceback is in the daemon's log"
        if reason is None:
            if entry.attempts < self.args.max_attempts:
                return entry
            error = f"training process {how}; gave up after {entry.attempts} attempts (see the daemon's log)"
        elif repeated:
            error = f"{reason} (training process {how} the same way twice in a row: not retried; {log})"
        elif entry.attempts >= self.args.max_attempts:
            error = f"{reason} (training process {how}; gave up after {entry.attempts} attempts; {log})"
        else:
            return entry
        fail_file(self.ledger, entry, error, self.args.output_dir)
        entry = self.ledger.get(entry.id) or entry
        self.status.record_outcome(HistoryRow.failed(entry.name, error, sha256=entry.sha256))
        return entry

    def _claim_entry(self, claimed: Path, sha: str, size: int) -> Entry | None:
        """This claim's ledger row (made now for a new claim); None when the file is skipped as a duplicate."""
        entry = self.ledger.find_claim(claimed.name, sha)  # only a row not yet filed away: this very claim
        if entry is not None:
            return entry
        earlier = self.ledger.find(sha, (FileState.DONE,))
        if earlier is not None and not self.args.allow_duplicates:
            note = (
                f"skipped: same content (sha256 {sha[:12]}...) as {earlier.name}, trained at steps "
                f"{earlier.start_step} -> {earlier.end_step}; pass --allow_duplicates to train it again"
            )
            logger.warning("%s: %s", printable(claimed.name), note)
            entry = self.ledger.add(claimed.name, FileState.DUPLICATE, sha, size, error=note)
            self._finish(claimed, entry, note)
            return None
        return self.ledger.add(claimed.name, FileState.QUEUED, sha, size)

    def _finish(self, claimed: Path, entry: Entry, error: str | None) -> None:
        target = self._file_away(claimed, entry, error)
        self.supervisor.refresh_report()  # the training process left it to the daemon (docs/operating.md "Seeing it")
        if target is None:
            return
        self.processed += 1
        if error is None:
            logger.info("done: %s", printable(str(target)))
        else:
            logger.error("failed: %s: %s", printable(target.name), printable(error))

    def _train_args(self, claimed: Path, ledger_id: int) -> list[str]:
        """The ``python -m daemon train`` flags of one attempt at a claimed file."""
        folders = ["--output_dir", self.args.output_dir, "--status_dir", self.args.status_dir]
        return ["--dataset", str(claimed), *folders, "--ledger_id", str(ledger_id), *self.train_argv]

    def request_stop(self, signum: int, frame: Any = None) -> None:
        """Signal handler: the first signal lets the child checkpoint and stop; a second kills it now.

        Args:
            signum: the signal (SIGINT or SIGTERM); a second one exits with ``128 + signum``.
            frame: unused (the signal module passes the interrupted frame).
        """
        if self.stop.is_set():
            logger.warning("second signal: killing the training process and exiting")
            self.supervisor.kill_all()
            os._exit(128 + signum)
        logger.warning("%s: stopping after the current checkpoint", signal.Signals(signum).name)
        self.stop.set()
        self.wake.set()


def parse_daemon_args(argv: list[str]) -> tuple[DaemonArguments, list[str]]:
    """Split flags into the daemon's own and those passed to every training child.

    A ``--config FILE`` is read once, here: the daemon takes its own keys, and the others
    reach every training child as flags, before the command line's (which win).

    Raises:
        ConfigError: a daemon option is invalid, or the config file cannot be read.
    """
    from transformers import HfArgumentParser  # argument parsing only: does not import torch

    parser = HfArgumentParser(DaemonArguments)  # type: ignore[arg-type]  # transformers types dataclasses narrowly
    parser.add_argument("--config", help=CONFIG_HELP + " Its training flags are passed to each file's run.")
    values, train_argv, training = read_flags(parser, argv)
    return DaemonArguments(**values), [*as_argv(training), *train_argv]


def check_training_flags(daemon_args: DaemonArguments, argv: list[str]) -> None:
    """Validate the training flags once, in a child, so a typo fails the daemon, not every file.

    Args:
        daemon_args: the daemon's options (its ``--output_dir`` is the children's).
        argv: the daemon's command line: the child reads its ``--config`` file as ``train.py``
            does, so a key no command knows is named with the file.

    Raises:
        ConfigError: with the child's one-line message.
    """
    path, rest = split_config(argv)
    _, train_argv = parse_daemon_args(rest)
    config = ["--config", path] if path else []
    cmd = [sys.executable, "-m", "daemon", "check-args", *config, "--output_dir", daemon_args.output_dir, *train_argv]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        raise ConfigError(lines[-1].removeprefix("error: ") if lines else f"flag check exited {result.returncode}")


def main(argv: list[str]) -> int:
    """``python -m daemon [--once] [--inbox_dir inbox] [training flags...]``.

    Locks the inbox, status and output folders first (flock, released by the kernel even
    when the daemon is killed), so a second daemon on any of them exits at once with one line.
    """
    try:
        daemon_args, train_argv = parse_daemon_args(argv)
        folders = [
            ("output", daemon_args.output_dir),  # first: a second daemon on the same tree is told about it
            ("status", daemon_args.status_dir),
            ("inbox", daemon_args.inbox_dir),
        ]
        locks = lock_folders(folders)
        try:
            check_training_flags(daemon_args, argv)
            daemon = Daemon(daemon_args, train_argv)
            # Inherited by every training child: it refuses a ledger other than this one.
            os.environ[LEDGER_ENV] = daemon.ledger.instance
            signal.signal(signal.SIGINT, daemon.request_stop)
            signal.signal(signal.SIGTERM, daemon.request_stop)
            logger.info("watching %s (output %s)", daemon_args.inbox_dir, daemon_args.output_dir)
            return daemon.run()
        finally:
            release_folders(locks)
    except DaemonError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
