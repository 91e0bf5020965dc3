"""The training process: one file's run from its flags to its export (torch, transformers, datasets).

Only this package imports the ML libraries; nothing outside it imports it, except the command
line's entry point (:mod:`daemon.__main__`), which hands it the training subcommands
(``tests/test_layout.py``).
"""
