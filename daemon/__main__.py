"""``python -m daemon``: the inbox daemon and its companions.

python -m daemon [--once] [--inbox_dir inbox] [--status_dir status] [--output_dir current_model] [training flags]
python -m daemon status [--json | --watch] [--samples]
python -m daemon report                                   (writes status/report.html)
python -m daemon rollback (--to_step N | --list)
python -m daemon rebuild-ledger [--force]
python -m daemon generate "PROMPT" [--max_new_tokens N] [--temperature T] [--seed S]
python -m daemon serve [--host 127.0.0.1] [--port 8000]   (an OpenAI-compatible server that follows the export)
python -m daemon train --dataset FILE.jsonl [flags]      (same as python train.py)
python -m daemon train-spare [line flags]                (the daemon's prestarted training process)

Every command takes ``--config FILE`` (the daemon's) and the folder flags ``--inbox_dir``,
``--status_dir`` and ``--output_dir`` (:mod:`daemon.config_file`).
"""

from __future__ import annotations

import gc
import json
import sys
from typing import NoReturn


def status_main(argv: list[str]) -> int:
    """Print the status summary and the forgetting matrix (or the raw document and matrix with ``--json``)."""
    from daemon.config_file import command_parser, parse_command
    from daemon.exceptions import ConfigError
    from daemon.quality.forgetting import build_matrix, format_figures, format_matrix, read_rows
    from daemon.store.status import StatusFile, latest_snapshot, read_history
    from daemon.views.summary import format_summary

    parser = command_parser("python -m daemon status", "Show the training status.")
    parser.add_argument(
        "--json", action="store_true", help="Print training_status.json with the forgetting matrix as 'matrix'."
    )
    parser.add_argument("--samples", action="store_true", help="Also print the latest snapshot's samples.md.")
    parser.add_argument("--watch", action="store_true", help="A live view, refreshed every second; Ctrl-C ends it.")
    try:
        args = parse_command(parser, argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    if args.watch:
        from daemon.views.live import watch

        return watch(args.status_dir)
    status = StatusFile(args.status_dir)
    doc, rows = status.read(), read_rows(args.status_dir)
    if args.json:
        print(json.dumps({**doc, "matrix": build_matrix(rows).as_dict()}, indent=2))
        return 0
    snapshot = latest_snapshot(args.status_dir, doc.get("global_step"))
    print(format_summary(doc, snapshot, read_history(args.status_dir)))
    for line in format_figures(doc) + format_matrix(rows):
        print(line)
    if args.samples and snapshot is not None:
        print()
        print((snapshot / "samples.md").read_text(encoding="utf-8"))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the subcommand of ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    A user-facing error (:class:`~daemon.exceptions.DaemonError`) or a fault of the machine (a
    folder read-only, not writable, full: :func:`~daemon.store.failures.fault_message`) that reaches
    here ends in one line on stderr and exit code 1; any other exception is a bug and keeps its
    traceback.
    """
    from daemon.exceptions import DaemonError
    from daemon.store.failures import fault_message

    try:
        return _dispatch(sys.argv[1:] if argv is None else argv)
    except DaemonError as e:
        message = str(e)
    except OSError as e:
        fault = fault_message(e)
        if fault is None:
            raise
        message = fault
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 1


def _dispatch(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    if command == "status":
        return status_main(argv[1:])
    if command == "report":  # reads the status folder only: no torch
        from daemon.config import configure_logging
        from daemon.views import report

        configure_logging()
        return report.main(argv[1:])
    if command == "rollback":  # moves files only: no torch
        from daemon.config import configure_logging
        from daemon.store import rollback

        configure_logging()
        return rollback.main(argv[1:])
    if command == "rebuild-ledger":  # rewrites the ledger from the history: no torch
        from daemon.config import configure_logging
        from daemon.service import rebuild

        configure_logging()
        return rebuild.main(argv[1:])
    if command == "generate":
        from daemon.training import generate

        return generate.main(argv[1:])
    if command == "serve":  # its own process: transformers' server, following the export
        from daemon.serving import cli as serving

        return serving.main(argv[1:])
    if command in ("train", "train-spare", "check-args"):
        if command != "check-args":
            from daemon.training.speed.allocator import keep_freed_memory, use_huge_pages

            keep_freed_memory()  # before torch is imported (its docstring says why)
            use_huge_pages()
        from daemon.training import cli

        if command == "train-spare":
            return cli.train_spare_main(argv[1:])
        return cli.main(argv[1:]) if command == "train" else cli.check_args_main(argv[1:])
    from daemon.config import configure_logging
    from daemon.service import cli as service

    configure_logging()
    return service.main(argv)


def exit_process(code: int) -> NoReturn:
    """End the process with ``code``, without the interpreter's last cycle collection over what it built.

    A training process holds millions of objects (torch, transformers, datasets, the model,
    the optimizer state); the collections of interpreter shutdown walked them all, and were
    most of the time the process took to exit after a file, time every file of the daemon's
    queue paid (BENCHMARKS.md, "Measurements behind the code"). ``gc.freeze()`` (Python docs,
    ``gc.freeze``) puts them out of the collector's reach: reference counting frees what it
    frees, atexit handlers and the flush of stdout and stderr run as before. Only finalizers of
    objects still in reference cycles at exit are skipped, which Python never promises to run
    (Python reference, ``object.__del__``).
    """
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
