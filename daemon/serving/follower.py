"""Following the export: each new ``export.json`` loaded beside the model serving, then swapped in.

``export.json`` is replaced last when an export moves in (:func:`daemon.store.checkpoints.export_model`),
so a change of it (a stat, polled each ``--poll_seconds``) is a new export, or a rollback to an
older one; its removal (a rollback to step 0) leaves no model served. The export is hard-linked
into a snapshot of the server's own (:func:`daemon.store.export_snapshot.snapshot_export`) and
loaded from there: its files stay as they are however many exports move in meanwhile.

- An export that is moving in (the marker ``.export.publishing``) is tried again at the next
  poll; a marker left by an install that failed part-way is logged once.
- A snapshot that cannot be written (no space left, an I/O error) is logged once per
  ``export.json`` and tried again after a back-off that doubles, up to :data:`MAX_BACKOFF_SECONDS`.
- An export that does not load, whatever the error, is logged; the model serving stays, and the
  next change of ``export.json`` is tried.
- When the model's process dies (killed for memory, a crash), the export is loaded again.

Engines replaced are stopped, and their snapshots removed, once their last request is answered.
Once :meth:`ExportFollower.close` returns nothing more is swapped in: an export still loading then
is stopped by the follower itself.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout
from transformers.cli.serving.model_manager import ModelLoader
from transformers.cli.serving.utils import GenerationState

from daemon.processes import running
from daemon.serving.engines import ExportEngine, ExportModels
from daemon.store.export_snapshot import PUBLISHING, Signature, export_signature, snapshot_export

logger = logging.getLogger(__name__)

_WORK_DIR_RE = re.compile(r"^\.serving-(\d+)$")  # an older server's folder: its process id only
_LOCKED_DIR_RE = re.compile(r"^\.serving-([A-Za-z0-9_.-]+-\d+-[0-9a-f]{8})$")  # <host>-<pid>-<random>, with a lock
_held: dict[Path, FileLock] = {}  # this process's snapshot folders and the locks that say they are in use
# Polls during which the publishing marker stays before it is reported (an install that failed part-way).
MARKER_POLLS = 30
MAX_BACKOFF_SECONDS = 300.0

# Makes an export's engine: ExportEngine's arguments (snapshot folder, global_step, served name, loader, generation).
EngineFactory = Callable[[Path, int, str, ModelLoader, GenerationState], ExportEngine]


def work_dir(output_dir: Path) -> Path:
    """``<output_dir>/.serving-<host>-<pid>-<random>``, new and empty: this server's snapshots (hard links need the
    same filesystem), held with a lock (``.serving-....lock`` beside it) until :func:`release_work_dir`.

    The folders of servers no longer running (killed without cleanup) are removed first: those whose lock nobody
    holds, whichever host or container left them (a process id alone named them before, and a server in another
    container or on another host over NFS looked dead and lost its folder); an older server's ``.serving-<pid>`` when
    no process has that id here.

    Raises:
        OSError: ``output_dir`` cannot be listed or written.
    """
    name = f".serving-{re.sub(r'[^A-Za-z0-9_.-]', '_', socket.gethostname())}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    lock = FileLock(output_dir / f"{name}.lock")
    lock.acquire()  # before the folder exists: a folder without its lock held is a gone server's
    for folder in output_dir.iterdir():
        if (m := _WORK_DIR_RE.match(folder.name)) and (int(m[1]) == os.getpid() or not running(int(m[1]))):
            shutil.rmtree(folder, ignore_errors=True)  # this process's id: an earlier process's folder, made anew
        elif _LOCKED_DIR_RE.match(folder.name) and folder.name != name:
            _remove_if_gone(folder)
        elif folder.suffix == ".lock" and _LOCKED_DIR_RE.match(folder.stem) and folder.stem != name:
            _remove_if_gone(folder.with_suffix(""))  # a lock left without its folder (killed between the two)
    folder = output_dir / name
    folder.mkdir()
    _held[folder] = lock
    return folder


def _remove_if_gone(folder: Path) -> None:
    """Remove another server's snapshot folder unless its lock is held (that server still runs)."""
    other = FileLock(folder.with_name(f"{folder.name}.lock"), timeout=0)
    try:
        other.acquire()
    except Timeout:
        return
    try:
        shutil.rmtree(folder, ignore_errors=True)
        Path(other.lock_file).unlink(missing_ok=True)
    finally:
        other.release()


def release_work_dir(folder: Path) -> None:
    """Remove this server's snapshot folder (:func:`work_dir`) and its lock; nothing happens for another folder."""
    shutil.rmtree(folder, ignore_errors=True)
    lock = _held.pop(folder, None)
    if lock is not None:
        Path(lock.lock_file).unlink(missing_ok=True)
        lock.release()


class ExportFollower:
    """Polls ``output_dir``'s ``export.json`` and swaps each new export into ``models`` once it is loaded.

    Args:
        models: the server's models.
        output_dir: the folder the daemon exports to.
        snapshots: a folder of this server's own on ``output_dir``'s filesystem (:func:`work_dir`).
        loader, generation_state: transformers' settings every export loads and generates with.
        poll_seconds: seconds between two looks at ``export.json``.
        engine: makes (loads) an export's engine; :class:`ExportEngine`, or a stand-in in tests.
    """

    def __init__(
        self,
        models: ExportModels,
        output_dir: Path,
        snapshots: Path,
        loader: ModelLoader,
        generation_state: GenerationState,
        poll_seconds: float = 1.0,
        engine: EngineFactory = ExportEngine,
    ) -> None:
        self.models, self.output_dir, self.snapshots = models, output_dir, snapshots
        self.loader, self.generation_state, self.poll_seconds = loader, generation_state, poll_seconds
        self.engine = engine
        self.stop = threading.Event()
        self._seen: Signature | None = None  # export.json's signature last loaded, or last failing to load
        self._revived: ExportEngine | None = None  # the engine whose death made the export load again
        self._revive_tries = 0  # failed loads since it died
        self._revive_at = 0.0  # when the next one is tried (monotonic seconds)
        self._marker_polls = 0  # polls in a row that found the publishing marker
        self._failed: tuple[Signature, int, float] | None = None  # a snapshot failing: signature, count, retry at
        self._swapping = threading.Lock()  # a swap and close() exclude each other
        self._numbers = itertools.count()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run :meth:`check` now and every ``poll_seconds`` in a thread, until :meth:`close`."""
        self._thread = threading.Thread(target=self._run, name="export-follower", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop polling; nothing is swapped in once this returns (an export still loading is stopped when loaded).

        Waits up to ``timeout`` seconds for a load in progress.
        """
        with self._swapping:
            self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.check()
            except Exception:  # a bug or a fault of the machine: the model serving stays, the next poll tries again
                logger.exception("following the export of %s failed", self.output_dir)
            self.stop.wait(self.poll_seconds)

    def check(self) -> int | None:
        """Load the export if ``export.json`` changed since the last load, and swap it in; stop idle replaced ones.

        Returns:
            The step swapped in, or None when nothing changed, the export is moving in (tried
            again next time), was removed (no model served then), its snapshot cannot be
            written (tried again after a back-off) or it does not load (tried again when
            ``export.json`` changes).
        """
        for engine in self.models.stop_idle():
            shutil.rmtree(engine.folder, ignore_errors=True)
        serving = self.models.current
        if serving is not None and serving.is_dead:
            if serving is not self._revived:
                logger.warning("the model process of step %d died: loading the export again", serving.global_step)
                self._seen, self._revived, self._revive_tries = None, serving, 0
            elif self._seen is not None and time.monotonic() >= self._revive_at:
                self._seen = None  # the load after its death failed: tried again after a back-off
        signature = export_signature(self.output_dir)
        if signature is None:
            self._seen = None
            if serving is not None:
                logger.warning("%s has no export any more: no model served until the next one", self.output_dir)
                self.models.swap(None)
            return None
        if signature == self._seen or self._backing_off(signature):
            return None
        snapshot = self._snapshot(signature)
        if snapshot is None:
            return None
        self._seen = snapshot.signature
        logger.info("loading the export of step %d (%s)", snapshot.global_step, self.output_dir)
        self.models.loading = snapshot.global_step
        try:
            engine = self.engine(
                snapshot.folder, snapshot.global_step, self.models.served_name, self.loader, self.generation_state
            )
        except Exception as e:
            self.models.loading = None
            shutil.rmtree(snapshot.folder, ignore_errors=True)
            expected = isinstance(e, (RuntimeError, OSError, ValueError))  # the others: a traceback, for a bug report
            if serving is not None and serving.is_dead:  # nothing answers: tried again, each wait twice as long
                self._revive_tries += 1
                delay = min(self.poll_seconds * 2**self._revive_tries, MAX_BACKOFF_SECONDS)
                self._revive_at = time.monotonic() + delay
                still = f"nothing (the model process of step {serving.global_step} died) for {delay:.3g} s, then again"
            else:
                still = ("nothing" if serving is None else f"step {serving.global_step}") + " until export.json changes"
            logger.error(
                "the export of step %d does not load (%s: %s): serving %s",
                snapshot.global_step,
                type(e).__name__,
                e,
                still,
                exc_info=not expected,
            )
            return None
        with self._swapping:
            if not self.stop.is_set():
                self.models.swap(engine)  # ends the loading too
                logger.info("serving the export of step %d", snapshot.global_step)
                return snapshot.global_step
        self.models.loading = None
        engine.shutdown("the server is stopping")  # loaded after close(): nobody else would stop it
        shutil.rmtree(snapshot.folder, ignore_errors=True)
        return None

    def _backing_off(self, signature: Signature) -> bool:
        return self._failed is not None and self._failed[0] == signature and time.monotonic() < self._failed[2]

    def _snapshot(self, signature: Signature) -> _Snapshot | None:
        """The export linked into a new snapshot folder, or None (moving in, or the snapshot failed: logged)."""
        folder = self.snapshots / f"export-{next(self._numbers)}"
        try:
            snapshot = snapshot_export(self.output_dir, folder)
        except OSError as e:
            count = self._failed[1] + 1 if self._failed is not None and self._failed[0] == signature else 1
            delay = min(self.poll_seconds * 2**count, MAX_BACKOFF_SECONDS)
            self._failed = (signature, count, time.monotonic() + delay)
            if count == 1:  # once per export.json: an export too big for the disk would fill the log otherwise
                logger.error(
                    "cannot snapshot the export of %s into %s (%s): tried again after a back-off, up to %.0f s",
                    self.output_dir,
                    self.snapshots,
                    e,
                    MAX_BACKOFF_SECONDS,
                )
            return None
        self._failed = None
        if snapshot is None and (self.output_dir / PUBLISHING).exists():
            self._marker_polls += 1
            if self._marker_polls == MARKER_POLLS:
                logger.warning(
                    "%s has been there for %d polls: an install that failed part-way? Serving %s until the next export",
                    self.output_dir / PUBLISHING,
                    MARKER_POLLS,
                    "nothing" if self.models.current is None else f"step {self.models.current.global_step}",
                )
        else:
            self._marker_polls = 0
        return None if snapshot is None else _Snapshot(folder, snapshot.global_step, snapshot.signature)


@dataclass(frozen=True)
class _Snapshot:
    """A snapshot taken: its folder, its step and ``export.json``'s signature."""

    folder: Path
    global_step: int
    signature: Signature
