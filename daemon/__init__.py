"""Continuous training daemon for causal language models.

Modules, one concept each: ``config`` (flags), ``data`` (JSONL to examples),
``model`` (bootstrap or load), ``checkpoints`` (latest complete one),
``training`` (step accounting and the Trainer), ``status`` (status file,
history, heartbeat), ``snapshots`` (evolution snapshots), ``inbox`` (the drop
zone and its folders), ``supervisor`` (the training child process), ``watcher``
(the daemon loop and its per-file policy), ``make_dataset`` (folders of text to
JSONL), ``exceptions``.

Importing the package imports nothing heavy: the daemon process never loads torch.
"""

__version__ = "0.1.0"
