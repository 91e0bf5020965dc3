"""The daemon's command line: ``python -m daemon [flags]`` parsed, checked, locked, then the loop run."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar

from daemon.config import LEDGER_ENV, DaemonArguments
from daemon.config_file import CONFIG_HELP, as_argv, read_flags, split_config
from daemon.config_ops import OpsArguments
from daemon.exceptions import ConfigError, DaemonError
from daemon.service.ops import watched
from daemon.service.watcher import Daemon
from daemon.store.locks import lock_folders, release_folders
from daemon.store.rollback import finish_interrupted_work

logger = logging.getLogger(__name__)
T = TypeVar("T")


def parse_daemon_args(argv: list[str]) -> tuple[DaemonArguments, OpsArguments, list[str]]:
    """Split flags into the daemon's own, its webhooks' and metrics' (:mod:`daemon.config_ops`), and the rest.

    A ``--config FILE`` is read once, here: the daemon takes its own keys, and the others
    reach every training child as flags, before the command line's (which win).

    Returns:
        ``(daemon_args, ops, train_argv)``: ``train_argv`` goes to every training child.

    Raises:
        ConfigError: a daemon option is invalid (every invalid one named in the one message), or
            the config file cannot be read.
    """
    from transformers import HfArgumentParser  # argument parsing only: does not import torch

    parser = HfArgumentParser((DaemonArguments, OpsArguments))  # type: ignore[arg-type]  # typed narrowly
    parser.add_argument("--config", help=CONFIG_HELP + " Its training flags are passed to each file's run.")
    values, train_argv, training = read_flags(parser, argv)
    ops_values = {f.name: values.pop(f.name) for f in fields(OpsArguments)}
    problems: list[str] = []
    daemon_args, ops = _checked(DaemonArguments, values, problems), _checked(OpsArguments, ops_values, problems)
    if daemon_args is None or ops is None:
        raise ConfigError("; ".join(problems))
    return daemon_args, ops, [*as_argv(training), *train_argv]


def _checked(kind: Callable[..., T], values: dict[str, Any], problems: list[str]) -> T | None:
    """``kind(**values)``, or None with its :class:`ConfigError` added to ``problems``."""
    try:
        return kind(**values)
    except ConfigError as e:
        problems.append(str(e))
        return None


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
    _, _, train_argv = parse_daemon_args(rest)
    config = ["--config", path] if path else []
    folders = ["--output_dir", daemon_args.output_dir, "--status_dir", daemon_args.status_dir]  # the children's
    cmd = [sys.executable, "-m", "daemon", "check-args", *config, *folders, *train_argv]
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
        daemon_args, ops, train_argv = parse_daemon_args(argv)
        folders = [
            ("output", daemon_args.output_dir),  # first: a second daemon on the same tree is told about it
            ("status", daemon_args.status_dir),
            ("inbox", daemon_args.inbox_dir),
        ]
        locks = lock_folders(folders)
        try:
            # before the flag check: --use_peft and its defaults follow the checkpoints as the kill's work leaves them
            finish_interrupted_work(daemon_args.output_dir, daemon_args.status_dir)
            check_training_flags(daemon_args, argv)
            daemon = Daemon(daemon_args, train_argv)
            # Inherited by every training child: it refuses a ledger other than this one.
            os.environ[LEDGER_ENV] = daemon.ledger.instance
            signal.signal(signal.SIGINT, daemon.request_stop)
            signal.signal(signal.SIGTERM, daemon.request_stop)
            logger.info("watching %s (output %s)", daemon_args.inbox_dir, daemon_args.output_dir)
            with watched(daemon, ops):
                return daemon.run()
        finally:
            release_folders(locks)
    except DaemonError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
