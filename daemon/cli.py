"""Entry points of the training process: ``train.py``, ``python -m daemon train`` and its companions.

- :func:`main`: ``python train.py --dataset FILE.jsonl [flags]`` (the daemon's child runs
  the same, as ``python -m daemon train``); prints one line and exits with a code.
- :func:`train_spare_main`: the daemon's prestarted training process (``--prestart``).
- :func:`check_args_main`: validates the training flags once when the daemon starts.
- :func:`exit_with_supervisor`: a training child dies with its daemon.
- :func:`owning`: what a training run owns while it runs (:func:`claim_folders`: its status
  and output folders; :func:`dataset_cache_claim`: a shared claim on the Arrow cache, whose
  leftovers from killed runs it removes when no other run of the product uses the cache).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from daemon.arguments import Flags, parse_args
from daemon.config import SUPERVISOR_ENV, configure_logging
from daemon.exceptions import ConfigError, DaemonError, TrainingInterrupted
from daemon.run import train_file
from daemon.supervisor import FolderBusy, FolderLock, lock_folders, release_folders

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 3
CACHE_LOCK = ".continual-daemon.lock"
# The Arrow folders of this product's files in the datasets cache: load_records names them by its fingerprint
# "<shape>-<text_field>-<sha256>-rules<N>", under generator/ with "default-fingerprint=" (Dataset.from_generator).
# A killed run leaves "<version>.incomplete/" there (from_generator) or "<version>/tmpXXXXXXXX" (map, shuffle,
# train_test_split write a NamedTemporaryFile beside their cache file, renamed only when complete).
_PRODUCT_FOLDER = re.compile(r"default-fingerprint=.+-[0-9a-f]{64}-rules\d+")


def exit_with_supervisor(pid: int) -> None:
    """Kill this process group once the daemon ``pid`` is gone (e.g. SIGKILLed).

    The daemon starts each child in a session of its own (so a terminal's Ctrl-C
    reaches only the daemon); without this, a killed daemon would leave an orphan
    training on and racing the next daemon's child for the same checkpoints.
    """

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                logger.error("the daemon (pid %d) is gone: stopping this training process group", pid)
                os.killpg(0, signal.SIGKILL)
            except PermissionError:  # alive, owned by another user
                pass

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


@contextmanager
def owning(flags: Flags) -> Iterator[None]:
    """What a training run owns while it runs: its output and status folders, and a claim on the Arrow cache.

    Entered by :func:`daemon.run.train_file` before it writes anything.

    Args:
        flags: the run's flags.

    Raises:
        FolderBusy: another daemon or ``train.py`` owns a folder.
    """
    locks = claim_folders(flags, supervised=bool(os.environ.get(SUPERVISOR_ENV)))
    try:
        with dataset_cache_claim(flags.data.dataset_cache_dir):
            yield
    finally:
        release_folders(locks)


def claim_folders(flags: Flags, supervised: bool) -> list[FolderLock]:
    """Lock the run's output and status folders (``.daemon.lock``), as a daemon does, or refuse to run.

    Under ``torchrun`` rank 0 locks and every rank learns its answer, so all stop together.

    Args:
        flags: the run's flags (``--output_dir``, ``--status_dir``, the world).
        supervised: this is a daemon's training child: its daemon holds these locks for it.

    Returns:
        The locks this process holds (none on ranks other than 0, nor in a daemon's child).

    Raises:
        FolderBusy: another daemon or ``train.py`` owns a folder; nothing has been written.
    """
    folders = [("output", str(flags.training.output_dir)), ("status", flags.status.status_dir)]
    locks: list[FolderLock] = []
    error: str | None = None
    if flags.training.process_index == 0:
        try:
            locks = lock_folders(folders, trust_supervisor=supervised)
        except FolderBusy as e:
            error = str(e)
    if flags.training.world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            answer = [error]
            dist.broadcast_object_list(answer, src=0)
            error = answer[0]
    if error is not None:
        release_folders(locks)
        raise FolderBusy(error)
    return locks


@contextmanager
def dataset_cache_claim(cache_dir: str | None) -> Iterator[Path]:
    """Hold a shared ``flock`` on the Arrow cache while this run may write it; clean it first if no run holds one.

    Every training process of the product holds the shared lock from before its first
    cache write until it ends (the kernel drops it when the process is killed). One that
    finds the lock free (no other run of the product uses the cache) first takes it
    exclusively and removes the temporary files killed runs left in the product's folders
    (see :data:`_PRODUCT_FOLDER`), which no live process can be writing then.

    Args:
        cache_dir: ``--dataset_cache_dir``; None for the datasets cache.

    Yields:
        The cache folder.
    """
    import datasets

    root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / CACHE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another run uses the dataset cache %s: its temporary files are left to it", root)
        else:
            remove_cache_leftovers(root)
        fcntl.flock(fd, fcntl.LOCK_SH)  # exclusive -> shared, or wait for another run's cleaning to end
        yield root
    finally:
        os.close(fd)


def remove_cache_leftovers(root: Path) -> list[Path]:
    """Delete what killed runs left in the product's Arrow folders under ``root``; call only under the exclusive lock.

    Lock files (``*.lock``) stay: datasets keeps them after every run, and deleting a lock
    file another process may hold would break its lock.

    Returns:
        The paths removed.
    """
    removed = []
    folders = [f for f in root.glob("generator/default-fingerprint=*") if _PRODUCT_FOLDER.fullmatch(f.name)]
    for folder in folders:
        for path in [*folder.glob("*.incomplete"), *folder.glob("*/tmp????????")]:
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
    if removed:
        logger.info("removed %d temporary files killed runs left in %s", len(removed), root)
    return removed


def check_args_main(argv: list[str]) -> int:
    """``python -m daemon check-args [flags]``: validate training flags only (the daemon calls it at start)."""
    try:
        parse_args(argv)
    except DaemonError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python train.py --dataset FILE.jsonl [flags]``: train one file; returns the exit code.

    Exit codes: 0 trained, 1 a user-facing error (one line on stderr), 2 bad usage
    (argparse), 3 interrupted by a signal after checkpointing.
    """
    configure_logging()
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get(SUPERVISOR_ENV):
        exit_with_supervisor(int(os.environ[SUPERVISOR_ENV]))
    try:
        flags = parse_args(argv)
        if not flags.data.dataset:
            raise ConfigError("--dataset FILE.jsonl is required")
        if not sys.stderr.isatty():  # \r-progress bars are noise in a log file or a pipe
            import datasets
            import transformers

            datasets.disable_progress_bars()
            transformers.utils.logging.disable_progress_bar()
        row = train_file(flags)  # owns its folders and its cache claim meanwhile (owning)
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except DaemonError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    # train_loss is None when a resumed file had no step left (only its evaluation and export).
    train_loss = "-" if row.train_loss is None else f"{row.train_loss:.4f}"
    print(
        f"trained {row.file}: steps {row.start_step} -> {row.end_step} "
        f"({row.planned_steps} steps, {row.examples} examples), train_loss {train_loss}"
        + (f", eval_loss {row.eval_loss:.4f}" if row.eval_loss is not None else ""),
        flush=True,
    )
    return 0


def train_spare_main() -> int:
    """``python -m daemon train-spare``: import everything, then train with the flags read from stdin.

    The daemon starts one ahead of time (``--prestart``) and writes one JSON list of
    ``train`` flags when a file arrives; end of input without a line (the daemon went
    away) exits 0 having done nothing.
    """
    import datasets  # noqa: F401 - imported now, not when the file has arrived

    line = sys.stdin.readline()
    return main(json.loads(line)) if line.strip() else 0
