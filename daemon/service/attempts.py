"""A failed attempt at a file: counted, and the file failed when another would only fail again."""

from __future__ import annotations

import logging
from collections.abc import Callable

from daemon.config import DaemonArguments
from daemon.names import printable
from daemon.service.supervisor import ChildResult
from daemon.store.ledger import Ledger, LedgerRow
from daemon.store.records import HistoryRow
from daemon.store.status import StatusFile
from daemon.store.undo import fail_file

logger = logging.getLogger(__name__)


def count_attempt(
    ledger: Ledger,
    status: StatusFile,
    entry: LedgerRow,
    result: ChildResult,
    args: DaemonArguments,
    on_stall: Callable[[LedgerRow], None] | None = None,
) -> LedgerRow:
    """Count a failed attempt at ``entry``'s file; fail the file when :func:`give_up_reason` says to.

    Args:
        on_stall: called with the row, this attempt counted, when the attempt was a stall (before
            the file is failed, if it is); it must not raise (``ops.watched`` sends the ``stalled`` event).

    Returns:
        The ledger row after the attempt (``failed``, its steps undone, or still to be tried).
    """
    previous = entry.error
    entry = ledger.count_attempt(entry.id, result.reason or f"training process {result.describe()}")
    said = result.reason or "no reason left"
    logger.error(
        "%s: attempt %d: training process %s: %s", printable(entry.name), entry.attempts, result.describe(), said
    )
    if result.stalled and on_stall is not None:
        on_stall(entry)
    error = give_up_reason(result, previous, entry.attempts, args.max_attempts)
    if error is None:
        return entry
    fail_file(ledger, entry, error, args.output_dir)
    entry = ledger.get(entry.id) or entry
    status.record_outcome(HistoryRow.failed(entry.name, error, sha256=entry.sha256))
    return entry


def give_up_reason(result: ChildResult, previous_error: str | None, attempts: int, max_attempts: int) -> str | None:
    """The file's error when a failed attempt should be its last, else None (the file is tried again).

    A reason the child left (an exception) that is the same as the previous attempt's is
    deterministic: retrying it again would only fail again. A crash of the machine's kind
    (killed by a signal, stalled, dead before it could say why) is retried up to ``max_attempts``.

    Args:
        result: how the attempt's training process ended.
        previous_error: the ledger row's error before this attempt.
        attempts: attempts counted so far, this one included.
        max_attempts: ``--max_attempts``.
    """
    how, reason = result.describe(), result.reason
    log = "its traceback is in the daemon's log"
    if reason is None:
        if attempts < max_attempts:
            return None
        return f"training process {how}; gave up after {attempts} attempts (see the daemon's log)"
    if reason == previous_error:
        return f"{reason} (training process {how} the same way twice in a row: not retried; {log})"
    if attempts >= max_attempts:
        return f"{reason} (training process {how}; gave up after {attempts} attempts; {log})"
    return None
