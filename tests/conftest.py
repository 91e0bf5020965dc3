"""Shared fixtures: a temporary project tree, the tiny tokenizer and export, and a guard against leaked threads
and child processes.

Helpers (the tree, real text, the tiny model, CLI and daemon runners) are in ``helpers.py``.
"""

from __future__ import annotations

import os

# `make test` runs two pytest-xdist workers on two cores: with torch's default of one OpenMP thread
# per core each, two training processes oversubscribe the cores and their OpenMP barriers spin
# against each other (a tiny model's step measured 10x slower). One intra-op thread per process
# (inherited by every child) keeps each worker on its core; the tiny models gain nothing from more.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402
import pytest  # noqa: E402
from helpers import Tree, export_tiny, new_tree, stdlib_documents  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory: pytest.TempPathFactory):
    """``--grad_workers auto`` caches its measurement under ``$XDG_CACHE_HOME``: never the tester's home."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))  # child processes inherit it
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE of 400 tokens trained on 40 documents of the standard library (read-only)."""
    from daemon.training.model import train_tokenizer

    return train_tokenizer(stdlib_documents(limit=40), vocab_size=400)


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported as the product exports (``helpers.export_tiny``); tests only read it."""
    return export_tiny(tmp_path_factory.mktemp("exported") / "current_model")


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return new_tree(tmp_path)


# Threads that libraries start once per process and keep on purpose.
_BENIGN_THREADS = ("tqdm_monitor", "TMonitor", "pydevd")


@pytest.fixture(autouse=True)
def no_leaked_threads_or_children():
    """Fail a test that leaves a thread or a child process behind (waits up to 5 s for them to end)."""
    before = {t.ident for t in threading.enumerate()}
    yield
    deadline = time.monotonic() + 5
    while True:
        threads = [
            t
            for t in threading.enumerate()
            if t.ident not in before and t.is_alive() and not t.name.startswith(_BENIGN_THREADS)
        ]
        children = [c for c in psutil.Process().children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]
        if not threads and not children:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"leaked threads {[t.name for t in threads]} / children {[c.pid for c in children]}")
        time.sleep(0.05)
