"""Everything on disk that both processes share: records, status, the ledger, checkpoints and the export,
the evaluation suite, the replay store, rollback, and reading a drop.

Torch-free at import time; never imports :mod:`daemon.training` (``tests/test_layout.py``).
"""
