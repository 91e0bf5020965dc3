"""Named errors of the product.

Every :class:`DaemonError` is a *user-facing* failure: bad input, a bad flag, a
checkpoint that cannot be used. Entry points print its message as one line and
exit non-zero without a traceback. Anything else that escapes is a bug and keeps
its traceback.
"""


class DaemonError(Exception):
    """Base class for failures a user can act on (shown as one line, exit code 1)."""


class ConfigError(DaemonError):
    """A flag or config-file value is invalid; the message names the flag."""


class DatasetError(DaemonError):
    """A dataset file cannot be trained: unreadable, binary, or without usable examples."""


class CheckpointError(DaemonError):
    """A checkpoint or model directory cannot be used to continue training."""


class TrainingError(DaemonError):
    """Training ran but broke a guarantee (e.g. stopped before ``max_steps``)."""


class TrainingInterrupted(DaemonError):
    """SIGINT/SIGTERM arrived; the run checkpointed and stopped before finishing the file."""


class FolderBusy(DaemonError):
    """A folder this process must own is locked by another daemon or ``train.py``."""


class MachineFault(DaemonError):
    """The machine refuses what a run needs: a folder read-only, not writable, full, or not a folder.

    The message names the path and what to do (:func:`daemon.failures.fault_message`).
    """


class LedgerError(MachineFault):
    """``ledger.sqlite`` cannot be used: damaged (not a database), locked too long, or not writable."""


class LedgerReplaced(DaemonError):
    """The ledger file is gone or is another ledger than the one this process (or its daemon) opened."""


class RollbackError(DaemonError):
    """A rollback cannot be done: the step is not a kept file boundary, or a pending one is another folder's."""


class RegressionError(DaemonError):
    """The quality gate rolls a file back: it raised the loss on earlier slices beyond ``--max_regression``.

    Attributes:
        quality_gate: the gate's figures (:func:`daemon.forgetting.quality_gate`), for the history row.
    """

    def __init__(self, message: str, quality_gate: dict) -> None:
        super().__init__(message)
        self.quality_gate = quality_gate
