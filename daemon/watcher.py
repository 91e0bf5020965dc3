"""The inbox daemon: decides *what* to train and *when*; never touches model APIs.

``python -m daemon`` watches ``inbox/`` with a watchdog observer (plus a start-up
scan and a periodic rescan, so files that arrived while it was down, or whose
events were missed, are not lost). A file is picked once it is completely
written: it was renamed in, or it was closed after writing, or its size and
mtime stayed unchanged for ``--settle_seconds``. Names starting with ``.`` and
ending in ``.tmp`` or ``.part`` are ignored.

Files train one at a time, in arrival order. Each is claimed by an atomic
rename into ``inbox/processing/``, trained by a child process running the same
code path as ``python train.py --dataset`` (``python -m daemon train``), then
moved to ``inbox/done/`` or to ``inbox/failed/`` beside ``<name>.error.txt``.

This module imports neither torch nor transformers' model code.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from watchdog.events import FileClosedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from daemon.config import DaemonArguments, config_file_to_argv
from daemon.exceptions import ConfigError, DaemonError
from daemon.status import StatusFile, read_history, utc_now

logger = logging.getLogger(__name__)

PROCESSING, DONE, FAILED = "processing", "done", "failed"
IGNORED_SUFFIXES = (".tmp", ".part")
EXIT_INTERRUPTED = 3  # the child checkpointed and stopped on SIGTERM (daemon.training.EXIT_INTERRUPTED)


def is_ignored_name(name: str) -> bool:
    """True for names a writer uses while still writing: ``.*``, ``*.tmp``, ``*.part``."""
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)


@dataclass
class Candidate:
    """A file in the drop zone, in arrival order (``seq``), with its last close event if any."""

    path: Path
    seq: int
    closed_mtime: float | None = None


class Inbox:
    """The drop zone and its ``processing/``, ``done/`` and ``failed/`` folders.

    Args:
        root: the inbox folder (created with its subfolders).
        settle_seconds: how long size and mtime must stay unchanged before a file
            without a close event counts as completely written.
    """

    def __init__(self, root: str | Path, settle_seconds: float) -> None:
        self.root = Path(root)
        self.settle_seconds = settle_seconds
        for sub in (PROCESSING, DONE, FAILED):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._seq = itertools.count()
        self._known: dict[str, Candidate] = {}
        self._lock = threading.Lock()

    def note_closed(self, path: Path) -> None:
        """Record a close-after-write event: the file is complete unless modified again."""
        with self._lock:
            cand = self._known.get(path.name)
            try:
                mtime = path.stat().st_mtime
            except OSError:
                return
            if cand is None:
                cand = self._known[path.name] = Candidate(path, next(self._seq))
            cand.closed_mtime = mtime

    def scan(self) -> list[Candidate]:
        """All candidate files now in the drop zone, in arrival order.

        Files first seen in the same scan are ordered by mtime, then name.
        """
        entries = []
        for entry in os.scandir(self.root):
            if is_ignored_name(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            try:
                entries.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
            except OSError:
                continue
        with self._lock:
            present = {name for _, name in entries}
            for name in list(self._known):
                if name not in present:
                    del self._known[name]
            for _, name in sorted(entries):
                if name not in self._known:
                    self._known[name] = Candidate(self.root / name, next(self._seq))
            return sorted(self._known.values(), key=lambda c: c.seq)

    def is_complete(self, cand: Candidate, now: float | None = None) -> bool:
        """Whether the writer is done: closed and untouched since, or unchanged for ``settle_seconds``."""
        try:
            mtime = cand.path.stat().st_mtime
        except OSError:
            return False
        if cand.closed_mtime is not None and cand.closed_mtime == mtime:
            return True
        return (now if now is not None else time.time()) - mtime >= self.settle_seconds

    def claim(self, cand: Candidate) -> Path:
        """Move the file out of the drop zone into ``processing/`` (atomic rename)."""
        target = _free_name(self.root / PROCESSING / cand.path.name)
        os.rename(cand.path, target)
        with self._lock:
            self._known.pop(cand.path.name, None)
        return target

    def finish(self, claimed: Path, error: str | None) -> Path:
        """Move a claimed file to ``done/`` or, with an ``error``, to ``failed/`` beside ``<name>.error.txt``."""
        folder = self.root / (FAILED if error is not None else DONE)
        target = _free_name(folder / claimed.name)
        os.rename(claimed, target)
        if error is not None:
            text = f"{target.name} failed at {utc_now()}:\n{error}\n"
            (folder / f"{target.name}.error.txt").write_text(text, encoding="utf-8")
        return target

    def recover_claimed(self) -> list[Path]:
        """Put files left in ``processing/`` by a stopped daemon back into the drop zone, first in line."""
        recovered: list[Path] = []
        for path in sorted((self.root / PROCESSING).iterdir()):
            if path.is_file():
                target = _free_name(self.root / path.name)
                os.rename(path, target)
                with self._lock:
                    self._known[target.name] = Candidate(target, -len(recovered) - 1)
                recovered.append(target)
        return recovered


def _free_name(path: Path) -> Path:
    """``path``, or ``stem-1.ext``, ``stem-2.ext``, ... if taken."""
    if not path.exists():
        return path
    for n in itertools.count(1):
        alt = path.with_name(f"{path.stem}-{n}{path.suffix}")
        if not alt.exists():
            return alt
    raise AssertionError("unreachable")


class _Wake(FileSystemEventHandler):
    """watchdog handler: any change in the inbox wakes the loop; close events mark files complete."""

    def __init__(self, inbox: Inbox, wake: threading.Event) -> None:
        self.inbox = inbox
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileClosedEvent) and not event.is_directory:
            self.inbox.note_closed(Path(os.fsdecode(event.src_path)))
        self.wake.set()


class Daemon:
    """The watch loop. ``run()`` returns an exit code.

    Args:
        args: the daemon's options.
        train_argv: flags passed through to every training child.
    """

    def __init__(self, args: DaemonArguments, train_argv: list[str]) -> None:
        self.args = args
        self.train_argv = train_argv
        self.inbox = Inbox(args.inbox_dir, args.settle_seconds)
        self.status = StatusFile(args.status_dir)
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.child: subprocess.Popen[bytes] | None = None
        self.processed = 0

    def run(self) -> int:
        """Drain and watch the inbox until stopped (or drained, with ``--once``)."""
        for path in self.inbox.recover_claimed():
            logger.warning("re-queued %s, left in processing/ by a stopped daemon", path.name)
        observer = Observer()
        observer.schedule(_Wake(self.inbox, self.wake), str(self.inbox.root), recursive=False)
        observer.start()
        try:
            self._loop()
        finally:
            observer.stop()
            observer.join()
            self.status.update(state="stopped" if self.stop.is_set() else "idle", pid=os.getpid())
        return 0

    def _loop(self) -> None:
        while not self.stop.is_set():
            pending = self.inbox.scan()
            self._publish_queue(pending)
            now = time.time()
            ready = [c for c in pending if self.inbox.is_complete(c, now)]
            if ready:
                self._train(ready[0])
                if self.args.max_files is not None and self.processed >= self.args.max_files:
                    return
                continue
            if self.args.once and not pending:
                logger.info("inbox drained")
                return
            # Sleep until an event, the next settle check, or the periodic rescan.
            timeout = min(self.args.rescan_seconds, max(self.args.settle_seconds / 4, 0.05)) if pending else None
            self.wake.wait(timeout or self.args.rescan_seconds)
            self.wake.clear()

    def _publish_queue(self, pending: list[Candidate]) -> None:
        names = [c.path.name for c in pending]

        def mutate(doc: dict[str, Any]) -> None:
            doc["queue"] = names
            doc["files"]["queued"] = len(names)
            if doc["state"] not in ("idle", "stopped", "failed", "stalled"):
                doc["state"] = "idle"  # no child runs while the daemon is choosing the next file

        self.status.update(mutate)

    def _train(self, cand: Candidate) -> None:
        claimed = self.inbox.claim(cand)
        logger.info("training %s", claimed.name)
        rows_before = len(read_history(self.args.status_dir))
        rc = self._run_child(claimed)
        if rc == EXIT_INTERRUPTED or (rc != 0 and self.stop.is_set()):
            logger.warning("%s stopped mid-file; it resumes on the next start", claimed.name)
            return  # stays in processing/; recover_claimed() re-queues it
        self.processed += 1
        if rc == 0:
            target = self.inbox.finish(claimed, None)
            logger.info("done: %s", target)
            return
        rows = read_history(self.args.status_dir)[rows_before:]
        recorded = [r for r in rows if r.get("outcome") == "failed"]
        if recorded:
            error = recorded[-1].get("error") or f"training process exited with code {rc}"
        else:  # the child died without recording (crash, usage error): record it here
            error = f"training process exited with code {rc}; see the daemon's log"
            self.status.record_outcome(_crash_row(claimed.name, error))
        target = self.inbox.finish(claimed, error)
        logger.error("failed: %s: %s", target.name, error)

    def _run_child(self, claimed: Path) -> int:
        cmd = [
            sys.executable,
            "-m",
            "daemon",
            "train",
            "--dataset",
            str(claimed),
            "--output_dir",
            self.args.output_dir,
            "--status_dir",
            self.args.status_dir,
            *self.train_argv,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # A session of its own: a Ctrl-C in the terminal reaches the daemon, which forwards one SIGTERM.
        self.child = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            return self.child.wait()
        finally:
            self.child = None

    def request_stop(self, signum: int, frame: Any = None) -> None:
        """Signal handler: first signal stops after the child checkpoints; a second kills the child now."""
        child = self.child
        if self.stop.is_set():
            logger.warning("second signal: killing the training process")
            if child is not None:
                os.killpg(child.pid, signal.SIGKILL)
            return
        logger.warning("%s: stopping after the current checkpoint", signal.Signals(signum).name)
        self.stop.set()
        self.wake.set()
        if child is not None:
            child.send_signal(signal.SIGTERM)


def _crash_row(name: str, error: str) -> dict[str, Any]:
    return {
        "file": name,
        "sha256": None,
        "start_step": None,
        "end_step": None,
        "planned_steps": None,
        "examples": None,
        "tokens": None,
        "wall_seconds": None,
        "train_loss": None,
        "eval_loss": None,
        "outcome": "failed",
        "error": error,
        "finished_at": utc_now(),
    }


def parse_daemon_args(argv: list[str]) -> tuple[DaemonArguments, list[str]]:
    """Split flags into the daemon's own and those passed to every training child.

    Raises:
        ConfigError: a daemon option is invalid.
    """
    from transformers import HfArgumentParser  # argument parsing only: does not import torch

    parser = HfArgumentParser(DaemonArguments)  # type: ignore[arg-type]  # transformers types dataclasses narrowly
    daemon_args, rest = parser.parse_args_into_dataclasses(
        args=config_file_to_argv(argv), return_remaining_strings=True
    )
    return daemon_args, rest


def check_training_flags(daemon_args: DaemonArguments, train_argv: list[str]) -> None:
    """Validate the pass-through flags once, in a child, so a typo fails the daemon, not every file.

    Raises:
        ConfigError: with the child's one-line message.
    """
    cmd = [sys.executable, "-m", "daemon", "check-args", "--output_dir", daemon_args.output_dir, *train_argv]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        raise ConfigError(lines[-1].removeprefix("error: ") if lines else f"flag check exited {result.returncode}")


def main(argv: list[str]) -> int:
    """``python -m daemon [--once] [--inbox_dir inbox] [training flags...]``."""
    try:
        daemon_args, train_argv = parse_daemon_args(argv)
        check_training_flags(daemon_args, train_argv)
        Path(daemon_args.output_dir).mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(Path(daemon_args.output_dir) / ".daemon.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout as e:
            raise DaemonError(f"another daemon is already training {daemon_args.output_dir}") from e
        try:
            daemon = Daemon(daemon_args, train_argv)
            signal.signal(signal.SIGINT, daemon.request_stop)
            signal.signal(signal.SIGTERM, daemon.request_stop)
            logger.info("watching %s (output %s)", daemon_args.inbox_dir, daemon_args.output_dir)
            return daemon.run()
        finally:
            lock.release()
    except DaemonError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
