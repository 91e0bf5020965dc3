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

    The message names the path and what to do (:func:`daemon.store.failures.fault_message`).
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
        quality_gate: the gate's figures (:func:`daemon.quality.forgetting.quality_gate`), for the history row.
    """

    def __init__(self, message: str, quality_gate: dict) -> None:
        super().__init__(message)
        self.quality_gate = quality_gate


class DiskFull(DaemonError):
    """The output folder's filesystem has no room for the next save; the run stopped before tearing anything.

    The file stays claimed and unfinished: run again once space is freed (the daemon waits and
    resumes by itself) and training resumes at the latest complete checkpoint.

    Attributes:
        path: the folder the save writes into.
        needed: bytes the save needs (the last checkpoint's size, plus the export's when one follows).
        free: bytes free on that filesystem when the save was refused or failed.
        resume_step: the step the next run resumes at, None when no checkpoint is complete yet.
    """

    def __init__(self, path: object, needed: int, free: int, what: str, resume_step: int | None) -> None:
        self.path, self.needed, self.free, self.resume_step = str(path), needed, free, resume_step
        resume = "its start" if resume_step is None else f"step {resume_step}"
        super().__init__(
            f"no space left in {path} for {what}: {needed:,} bytes needed ({needed / 1e6:.1f} MB), {free:,} free; "
            f"free some space and run again: training resumes at {resume}"
        )
