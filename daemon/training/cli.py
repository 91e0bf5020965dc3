"""Entry points of the training process: ``train.py``, ``python -m daemon train`` and its companions.

- :func:`main`: ``python train.py --dataset FILE.jsonl [flags]`` (the daemon's child runs
  the same, as ``python -m daemon train``); prints one line and exits with a code.
- :func:`train_spare_main`: the daemon's prestarted training process (``--prestart``).
- :func:`check_args_main`: validates the training flags once when the daemon starts.
- :func:`exit_with_supervisor`: a training child dies with its daemon.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time

from daemon.config import SUPERVISOR_ENV, SUPERVISOR_HOST_ENV, configure_logging
from daemon.exceptions import ConfigError, DaemonError, DiskFull, TrainingInterrupted
from daemon.processes import running
from daemon.store.durable import EXIT_NO_SPACE
from daemon.store.failures import leave_reason
from daemon.store.rollback import finish_interrupted_work, interrupted_work
from daemon.training.arguments import parse_args, run_folders
from daemon.training.claims import owning_folders
from daemon.training.run import train_file

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 3
_watching = False  # exit_with_supervisor's watch runs in this process


def exit_with_supervisor(pid: int, host: str | None = None) -> None:
    """Kill this process group once the daemon ``pid``, or the process that started this one, is gone.

    The daemon starts each child in a session of its own (so a terminal's Ctrl-C
    reaches only the daemon); without this, a killed daemon would leave an orphan
    training on and racing the next daemon's child for the same checkpoints. The parent is watched
    too: ``torchrun`` starts each rank in a session of its own, so a launcher killed with its group
    (a stalled attempt, a second stop signal) would otherwise leave its ranks training.

    Args:
        pid: the daemon's process id.
        host: the daemon's host name; on another machine (a rank a multi-node launcher started
            there) the daemon's pid names no process of ours, and only the parent is watched.
    """
    global _watching
    if _watching:  # the prestarted process started it before its flags arrived
        return
    _watching = True
    here = host is None or host == socket.gethostname()
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if here and not running(pid):
                logger.error("the daemon (pid %d) is gone: stopping this training process group", pid)
                os.killpg(0, signal.SIGKILL)
            if os.getppid() != parent:
                logger.error("the process that started this one (pid %d) is gone: stopping this process group", parent)
                os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def watch_the_daemon() -> None:
    """Under a daemon (its pid in the environment), :func:`exit_with_supervisor`; once per process."""
    if os.environ.get(SUPERVISOR_ENV):
        exit_with_supervisor(int(os.environ[SUPERVISOR_ENV]), os.environ.get(SUPERVISOR_HOST_ENV))


def check_args_main(argv: list[str]) -> int:
    """``python -m daemon check-args [flags]``: validate training flags only (the daemon calls it at start)."""
    try:
        parse_args(argv).evaluation.check_eval_files()
    except DaemonError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python train.py --dataset FILE.jsonl [flags]``: train one file; returns the exit code.

    Exit codes: 0 trained, 1 a user-facing error (one line on stderr), 2 bad usage
    (argparse), 3 interrupted by a signal after checkpointing, 4 no room in the output folder
    for the next save (one line naming it and the bytes needed; the file is left unfinished). A
    failing child of the daemon leaves its reason for it (:func:`daemon.store.failures.leave_reason`);
    any other exception propagates (:func:`daemon.__main__.main` prints a fault of the machine as one line).
    """
    configure_logging()
    argv = sys.argv[1:] if argv is None else argv
    watch_the_daemon()
    try:
        output_dir, status_dir = run_folders(argv)
        if interrupted_work(output_dir, status_dir):  # before the flags: their defaults follow the checkpoints
            with owning_folders(output_dir, status_dir):
                finish_interrupted_work(output_dir, status_dir)
        flags = parse_args(argv)
        if not flags.data.dataset:
            raise ConfigError("--dataset FILE.jsonl is required")
        if not os.environ.get(SUPERVISOR_ENV):
            flags.evaluation.check_eval_files()
        if not sys.stderr.isatty():  # \r-progress bars are noise in a log file or a pipe
            import datasets
            import transformers

            datasets.disable_progress_bars()
            transformers.utils.logging.disable_progress_bar()
        row = train_file(flags)  # owns its folders and its cache claim meanwhile (owning)
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except DiskFull as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_NO_SPACE
    except DaemonError as e:
        leave_reason(e)
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except Exception as e:  # a bug or a fault of the machine: the daemon learns why, the entry point reports it
        leave_reason(e)
        raise
    # train_loss is None when a resumed file had no step left (only its evaluation and export).
    train_loss = "-" if row.train_loss is None else f"{row.train_loss:.4f}"
    print(
        f"trained {row.file}: steps {row.start_step} -> {row.end_step} "
        f"({row.planned_steps} steps, {row.examples} examples), train_loss {train_loss}"
        + (f", eval_loss {row.eval_loss:.4f}" if row.eval_loss is not None else ""),
        flush=True,
    )
    return 0


def train_spare_main(line_argv: list[str] | None = None) -> int:
    """``python -m daemon train-spare [line flags]``: import everything, then train with the flags read from stdin.

    The daemon starts one ahead of time (``--prestart``) and writes one JSON list of
    ``train`` flags when a file arrives; end of input without a line (the daemon went
    away) exits 0 having done nothing. Started with the line's flags (its folders and the daemon's
    training flags: the daemon passes them when its inbox is idle), it first does what a pretrained
    line's first file needs of its base model (:func:`~daemon.training.prepare.prepare_idle_line`);
    a failure there is logged in one line and left to the file's own run, which meets it again.
    """
    import datasets  # noqa: F401 - imported now, not when the file has arrived

    if line_argv:
        configure_logging()
        watch_the_daemon()  # its work writes the status folder: never past its daemon's end
        try:
            from daemon.training.prepare import prepare_idle_line

            if prepare_idle_line(parse_args(line_argv)):
                logger.info("prestarted: the base model's answers are kept before the line's first file")
        except Exception as e:  # noqa: BLE001 - the first file's own run reports it where it belongs
            reason = (str(e).splitlines() or [""])[0]
            logger.warning("prestarted: the base model's answers not kept ahead (%s: %s)", type(e).__name__, reason)
    line = sys.stdin.readline()
    return main(json.loads(line)) if line.strip() else 0
