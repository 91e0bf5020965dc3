"""``python -m daemon rebuild-ledger``: a new ledger from ``history.jsonl``, the checkpoints and the inbox.

For a ``status/ledger.sqlite`` that is damaged (docs/operating.md "A damaged ledger"). With the
daemon stopped, it

1. moves the damaged file (and its ``-wal`` and ``-shm``) aside as ``ledger.sqlite.damaged-<UTC time>``;
2. writes one ``done`` row per done file of ``history.jsonl`` whose steps are still in the model
   (:func:`~daemon.store.status.standing_done_rows`), with its sha256 and plan, so the same content is
   still skipped as a duplicate and the kept file boundaries are still ones ``rollback`` can use;
   a done file still in ``inbox/processing/`` keeps its row unfiled, so the daemon only files it away;
3. says when the latest checkpoint is above the last done file's end: a file was half trained
   when the ledger was lost and its plan went with it, so the daemon would plan it again from
   that checkpoint and train its first steps twice. ``python -m daemon rollback --to_step END``
   takes those steps out first (it deletes checkpoints, so the command is printed, not run).

Failed, rejected and duplicate files are not restored: they hold no step of the model. A row's
``finished_at`` is the rebuild's time (the history keeps the original).

Standard library only: no torch.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from daemon.exceptions import DaemonError, LedgerError
from daemon.service.entries import sha256_of
from daemon.service.inbox import PROCESSING
from daemon.store.checkpoints import latest_complete_checkpoint
from daemon.store.ledger import Ledger
from daemon.store.ledger_file import LEDGER_FILE
from daemon.store.locks import lock_folders, release_folders
from daemon.store.records import FileState, utc_now
from daemon.store.status import read_history, standing_done_rows

logger = logging.getLogger(__name__)


def rebuild_ledger(
    status_dir: str | Path, output_dir: str | Path, inbox_dir: str | Path, force: bool = False
) -> list[str]:
    """Replace the ledger by one rebuilt from the history (call with the folders locked).

    Args:
        status_dir: the status folder (``ledger.sqlite``, ``history.jsonl``).
        output_dir: the running model's folder (its checkpoints).
        inbox_dir: the inbox (the files still in ``processing/``).
        force: rebuild a ledger that still opens, too.

    Returns:
        The lines that say what was done, for the user.

    Raises:
        DaemonError: the ledger opens fine and ``force`` is not given (nothing changed).
    """
    status = Path(status_dir)
    path = status / LEDGER_FILE
    lines = []
    if path.exists():
        if not force and _opens(status):
            raise DaemonError(f"{path} opens fine: nothing to rebuild (pass --force to rebuild it all the same)")
        stamp = utc_now().replace(":", "")
        for suffix in ("", "-wal", "-shm"):
            old = status / f"{LEDGER_FILE}{suffix}"
            if old.exists():
                os.replace(old, status / f"{LEDGER_FILE}{suffix}.damaged-{stamp}")
        lines.append(f"moved the old ledger aside: {path}.damaged-{stamp}")
    ledger = Ledger(status)
    claimed = _claimed(Path(inbox_dir) / PROCESSING)
    done = standing_done_rows(read_history(status))
    for row in done:
        entry = ledger.add(row["file"], FileState.QUEUED, row.get("sha256"))
        ledger.record_plan(entry.id, row["start_step"], row["planned_steps"], row.get("replayed_examples") or 0)
        ledger.finish(entry.id, row["end_step"])
        if (row["file"], row.get("sha256")) not in claimed:
            ledger.mark_filed(entry.id)
    lines.append(f"wrote {path} with the {len(done)} done files of {status / 'history.jsonl'}")
    end = done[-1]["end_step"] if done else 0
    latest = latest_complete_checkpoint(output_dir, set_aside=False)
    if latest is not None and latest.global_step > end:
        lines.append(
            f"warning: {latest.path.name} is above step {end}, where the last done file ended: a file was half "
            f"trained when the ledger was lost. Run 'python -m daemon rollback --to_step {end} --output_dir "
            f"{output_dir} --status_dir {status_dir}' before starting the daemon, so that it trains that file once"
        )
    return lines


def _opens(status: Path) -> bool:
    try:
        Ledger(status).entries()
    except LedgerError:
        return False
    return True


def _claimed(processing: Path) -> set[tuple[str, str]]:
    """``(name, sha256)`` of the files in ``processing/`` (none if it is missing)."""
    if not processing.is_dir():
        return set()
    return {(p.name, sha256_of(p)[0]) for p in processing.iterdir() if p.is_file() and not p.is_symlink()}


def main(argv: list[str]) -> int:
    """``python -m daemon rebuild-ledger [--force]`` with ``--config`` and the folder flags, as every command.

    Returns:
        The exit code: 0 rebuilt, 1 refused with one line (a daemon or ``train.py`` runs on
        these folders, or the ledger opens fine without ``--force``; nothing changed), 2 bad usage.
    """
    from daemon.config_file import command_parser, parse_command

    parser = command_parser(
        "python -m daemon rebuild-ledger",
        "Rebuild a damaged status/ledger.sqlite from history.jsonl, the checkpoints and the inbox.",
    )
    parser.add_argument("--force", action="store_true", help="Rebuild even a ledger that opens.")
    args = parse_command(parser, argv)
    folders = [("output", args.output_dir), ("status", args.status_dir), ("inbox", args.inbox_dir)]
    locks = lock_folders(folders)  # as a daemon takes them: refused while one runs
    try:
        lines = rebuild_ledger(args.status_dir, args.output_dir, args.inbox_dir, args.force)
    finally:
        release_folders(locks)
    for line in lines:
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout)
    return 0
