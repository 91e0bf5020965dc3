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
  retried (resuming at its latest checkpoint) up to ``--max_attempts``
  (:mod:`daemon.service.attempts`); then it
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
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.config import DaemonArguments
from daemon.names import printable
from daemon.service.attempts import count_attempt
from daemon.service.entries import rejection_reason
from daemon.service.inbox import Candidate, Inbox
from daemon.service.supervisor import ProcessSupervisor, Supervisor
from daemon.service.wake import Wake, new_observer
from daemon.store.adapter_files import finish_interrupted_merge
from daemon.store.checkpoints import latest_complete_checkpoint, space_needed
from daemon.store.durable import EXIT_NO_SPACE, wait_for_room
from daemon.store.ledger import Ledger, LedgerRow
from daemon.store.reconcile import reconcile
from daemon.store.records import FileState, RunState, utc_now
from daemon.store.rollback import finish_interrupted_work
from daemon.store.status import StatusFile

logger = logging.getLogger(__name__)

QUEUE_REFRESH_SECONDS = 2.0
DISK_POLL_SECONDS = 5.0  # at most, between two looks at the free space while waiting for disk
_BETWEEN_FILES = frozenset(state for state in RunState if state.between_files)


class QueueShown:
    """The files waiting, as the status shows them: the status is rewritten only when that changes.

    Args:
        status: the status file.
    """

    def __init__(self, status: StatusFile) -> None:
        self.status = status
        self._published: tuple[list[str], bool] | None = None  # (queue, between files) as last written
        self._refreshed = 0.0  # monotonic seconds of the last refresh while a file trains
        self._waiting = 0  # files waiting behind the one in training, as last shown

    def publish(self, pending: list[Candidate], between_files: bool = True) -> None:
        """Show ``pending`` (the files waiting, in arrival order) in the status, unless it shows them already.

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

    def forget(self) -> None:
        """A training process starts or ended: it writes the status, so what that shows is no longer known."""
        self._published = None
        self._refreshed = 0.0

    def refresh(self, inbox: Inbox) -> int:
        """While a file trains: show the files dropped meanwhile, at most every ``QUEUE_REFRESH_SECONDS``.

        Returns:
            How many files wait behind the one in training, as last shown.
        """
        if time.monotonic() - self._refreshed > QUEUE_REFRESH_SECONDS:
            pending = inbox.scan()
            self._waiting = len(pending)
            self.publish(pending, between_files=False)
            self._refreshed = time.monotonic()
        return self._waiting


class Daemon:
    """The watch loop and the per-file policy. ``run()`` returns an exit code.

    Args:
        args: the daemon's options.
        train_argv: flags passed through to every training child.
        supervisor: runs the training processes; default a :class:`ProcessSupervisor` from ``args`` (tests: a fake).
    """

    def __init__(self, args: DaemonArguments, train_argv: list[str], supervisor: Supervisor | None = None) -> None:
        self.args = args
        self.line_argv = ["--output_dir", args.output_dir, "--status_dir", args.status_dir, *train_argv]  # each child
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
        self.on_stall: Callable[[LedgerRow], None] | None = None  # told of each stalled attempt (ops.watched)
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.processed = 0
        self.queue = QueueShown(self.status)

    def run(self) -> int:
        """Drain and watch the inbox until stopped (or drained, with ``--once``).

        Returns:
            The process exit code (0; a stop request also ends in 0).

        Raises:
            RollbackError: an interrupted rollback in the status folder is another output folder's.
        """
        finish_interrupted_work(self.args.output_dir, self.args.status_dir)  # before anything reads the model
        latest = latest_complete_checkpoint(self.args.output_dir, set_aside=False)
        step = latest.global_step if latest else 0
        self.status.update(state=RunState.IDLE, global_step=step, max_steps=step, current_file=None, disk=None)
        self.ledger.mark_filed_unless_claimed(p.name for p in self.inbox.claimed())
        observer = new_observer()
        observer.schedule(
            Wake(self.inbox, self.wake), str(self.inbox.root), recursive=False, event_filter=list(Wake.EVENTS)
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
            self.queue.publish(pending)
            now = time.time()
            ready = [c for c in pending if self.inbox.is_complete(c, now)]
            if ready:
                with contextlib.suppress(OSError):  # gone, or held back for a while (logged)
                    self.inbox.claim(ready[0])
                continue
            if self.args.once and not pending:
                logger.info("inbox drained")
                return
            self.supervisor.start_spare(self.line_argv)  # idle: the next training process starts its work now
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

    def _file_away(self, path: Path, entry: LedgerRow, error: str | None) -> Path | None:
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

    def _while_training(self) -> None:
        """Every poll while a child trains: show files dropped meanwhile, and prestart the next file's
        training process, so that a queue pays the start-up once.

        The spare's imports run on one core while the child does its own (docs/speed.md). With
        ``--once`` it is started only when another file waits: a last file needs none.
        """
        if self.queue.refresh(self.inbox) or not self.args.once:
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

    def _train_entry(self, path: Path, entry: LedgerRow) -> LedgerRow:
        """Train ``path`` for the ledger row ``entry`` until the row is finished or the daemon stops.

        A training process that exits for want of disk space (:data:`~daemon.store.durable.EXIT_NO_SPACE`)
        is waited for (:meth:`_wait_for_disk`) and run again, without counting an attempt.

        Returns:
            The row as the last attempt left it.
        """
        while not entry.state.finished and not self.stop.is_set():
            logger.info("training %s (attempt %d)", printable(path.name), entry.attempts + 1)
            self.queue.forget()
            result = self.supervisor.run(self._train_args(path, entry.id), self.stop, self._while_training)
            self.queue.forget()  # the training process wrote the status: its state, maybe stale now
            entry = self.ledger.get(entry.id) or entry
            if entry.state.finished or self.stop.is_set():
                break
            if result.returncode == EXIT_NO_SPACE and not result.stalled:
                self._wait_for_disk()
            else:
                entry = count_attempt(self.ledger, self.status, entry, result, self.args, self.on_stall)
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
        self.queue.publish(self.inbox.scan(), between_files=False)

    def _reconcile(self) -> None:
        """Train again the steps of done files that the latest usable checkpoint lacks (:mod:`daemon.store.reconcile`).

        Raises:
            CheckpointError: a reopened file's data is no longer in the inbox (nothing is changed).
        """
        finish_interrupted_merge(self.args.output_dir)  # a child killed mid-swap: its step is the model's, not lost
        for _ in reconcile(self.ledger, self.status, self.args.output_dir, self.inbox.root, self._train_entry):
            self.supervisor.refresh_report()
            if self.stop.is_set():
                return

    def _claim_entry(self, claimed: Path, sha: str, size: int) -> LedgerRow | None:
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

    def _finish(self, claimed: Path, entry: LedgerRow, error: str | None) -> None:
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
        return ["--dataset", str(claimed), "--ledger_id", str(ledger_id), *self.line_argv]

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
