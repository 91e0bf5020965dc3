"""Continuous training daemon for causal language models.

Modules, one concept each (docs/layout.md says the same, with the tests):

- the training process: ``cli`` (entry points), ``arguments`` (TrainingArguments and
  parsing), ``config`` (the product's own flags), ``run`` (setup -> fit -> evaluate ->
  save), ``plan`` (step accounting), ``callbacks`` (Trainer callbacks), ``signals``
  (stopping), ``accumulation`` (multi-thread gradient accumulation), ``jsonl``
  (reading a drop), ``data`` (tokenization and packing), ``model`` (the starting
  model), ``checkpoints`` (checkpoints, rotation, roll-back, export), ``snapshots``,
  ``evaluation`` (scoring every slice within the budget), ``tensorboard_run`` (one
  TensorBoard run across files);
- shared, torch-free: ``records`` (states, history row, progress), ``status`` (status
  file, history, heartbeat), ``ledger`` (SQLite ledger and its transitions), ``locks``
  (folder locks, the cache claim), ``suite`` (the evaluation suite on disk),
  ``forgetting`` (evaluations.jsonl, the matrix, the quality gate), ``report`` (status/report.html;
  matplotlib only when drawing), ``live`` (``status --watch``), ``exceptions``;
- the daemon process (no torch): ``watcher`` (the loop and per-file policy), ``inbox``
  (the drop zone and its folders), ``entries`` (one inbox entry), ``names`` (escaping and
  shortening names), ``supervisor`` (the training child process);
- ``rollback`` (no torch): kept file boundaries, ``python -m daemon rollback``, and
  finishing a rollback a kill interrupted;
- ``make_dataset`` (folders of text to JSONL).

Importing the package imports nothing heavy: the daemon process never loads torch.
"""

__version__ = "0.1.0"
