"""Following the export: each new ``export.json`` loaded beside the model serving, then swapped in.

``export.json`` is replaced last when an export moves in (:func:`daemon.store.checkpoints.export_model`),
so a change of it (a stat, polled each ``--poll_seconds``) is a new export, or a rollback to an
older one. The export is hard-linked into a snapshot of the server's own
(:func:`daemon.store.export_snapshot.snapshot_export`) and loaded from there: its files stay as they
are however many exports move in meanwhile. An export that is moving in is tried again at the next
poll; one that does not load is logged, the model serving stays, and the next change of
``export.json`` is tried. When the model's process dies (killed for memory, a crash), the export is
loaded again. Engines replaced are stopped, and their snapshots removed, once their
last request is answered.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import threading
from pathlib import Path

from transformers.cli.serving.model_manager import ModelLoader
from transformers.cli.serving.utils import GenerationState

from daemon.serving.engines import ExportEngine, ExportModels
from daemon.store.export_snapshot import export_signature, snapshot_export

logger = logging.getLogger(__name__)

_WORK_DIR_RE = re.compile(r"^\.serving-(\d+)$")


def work_dir(output_dir: Path) -> Path:
    """``<output_dir>/.serving-<pid>``, new and empty: this server's snapshots (hard links need the same filesystem).

    Those of servers no longer running (killed without cleanup) are removed first.
    """
    for folder in output_dir.iterdir():
        if (m := _WORK_DIR_RE.match(folder.name)) and not _running(int(m[1])):
            shutil.rmtree(folder, ignore_errors=True)
    folder = output_dir / f".serving-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a folder of an earlier process with this id: this process makes it anew
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class ExportFollower:
    """Polls ``output_dir``'s ``export.json`` and swaps each new export into ``models`` once it is loaded.

    Args:
        models: the server's models.
        output_dir: the folder the daemon exports to.
        snapshots: a folder of this server's own on ``output_dir``'s filesystem (:func:`work_dir`).
        loader, generation_state: transformers' settings every export loads and generates with.
        poll_seconds: seconds between two looks at ``export.json``.
    """

    def __init__(
        self,
        models: ExportModels,
        output_dir: Path,
        snapshots: Path,
        loader: ModelLoader,
        generation_state: GenerationState,
        poll_seconds: float = 1.0,
    ) -> None:
        self.models, self.output_dir, self.snapshots = models, output_dir, snapshots
        self.loader, self.generation_state, self.poll_seconds = loader, generation_state, poll_seconds
        self.stop = threading.Event()
        self._seen: tuple[int, ...] | None = None  # export.json's signature last loaded, or last failing to load
        self._revived: ExportEngine | None = None  # the engine whose death made the export load again
        self._numbers = itertools.count()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run :meth:`check` now and every ``poll_seconds`` in a thread, until :meth:`close`."""
        self._thread = threading.Thread(target=self._run, name="export-follower", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop polling; waits up to ``timeout`` seconds for a load in progress (its process ends with the server)."""
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.check()
            except OSError as e:  # the snapshot folder cannot be written: the model serving stays
                logger.error("cannot snapshot the export of %s: %s", self.output_dir, e)
            self.stop.wait(self.poll_seconds)

    def check(self) -> int | None:
        """Load the export if ``export.json`` changed since the last load, and swap it in; stop idle replaced ones.

        Returns:
            The step swapped in, or None when nothing changed, the export is moving in (tried
            again next time) or it does not load (tried again when ``export.json`` changes).

        Raises:
            OSError: the snapshot folder cannot be written.
        """
        for engine in self.models.stop_idle():
            shutil.rmtree(engine.folder, ignore_errors=True)
        serving = self.models.current
        if serving is not None and serving.is_dead and serving is not self._revived:
            logger.warning("the model process of step %d died: loading the export again", serving.global_step)
            self._seen, self._revived = None, serving  # once per death: a load that fails waits for export.json
        signature = export_signature(self.output_dir)
        if signature is None or signature == self._seen:
            return None
        folder = self.snapshots / f"export-{next(self._numbers)}"
        snapshot = snapshot_export(self.output_dir, folder)
        if snapshot is None:
            return None
        self._seen = snapshot.signature
        logger.info("loading the export of step %d (%s)", snapshot.global_step, self.output_dir)
        try:
            engine = ExportEngine(
                folder, snapshot.global_step, self.models.served_name, self.loader, self.generation_state
            )
        except (RuntimeError, OSError, ValueError) as e:
            shutil.rmtree(folder, ignore_errors=True)
            still = "nothing" if serving is None else f"step {serving.global_step}"
            logger.error(
                "the export of step %d does not load (%s): serving %s until export.json changes",
                snapshot.global_step,
                e,
                still,
            )
            return None
        self.models.swap(engine)
        logger.info("serving the export of step %d", snapshot.global_step)
        return snapshot.global_step
