"""Continuous training daemon for causal language models.

Two processes, two packages (docs/layout.md has every module):

- :mod:`daemon.service`: the daemon process. The loop over the inbox, its folders and entries,
  and the training child it supervises. Never imports torch.
- :mod:`daemon.training`: the training process. One file's run from its flags to its export;
  the only package that imports torch, transformers and datasets, and nothing outside it
  imports it but the command line's entry point (:mod:`daemon.__main__`).
- :mod:`daemon.store`: what both read and write on disk: records, status, the ledger,
  checkpoints and the export, the evaluation suite, replay, rollback, reading a drop.
- :mod:`daemon.quality`: the evaluation rows read as answers: forgetting and the quality gate.
- :mod:`daemon.views`: what people read: the report, the live view, the model card.
- Shared, standard library only: ``config`` (the product's own flags), ``config_file``,
  ``exceptions``, ``names``, ``pretrained``; and ``make_dataset`` (folders of text to JSONL).

``tests/test_layout.py`` checks these rules. Importing the package imports nothing heavy.
"""

__version__ = "0.1.0"
