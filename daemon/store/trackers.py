"""``<status_dir>/trackers.json``: the one MLflow / W&B run and the model registry the training processes share.

Each file's training process is a new process, so the ids that make MLflow and Weights & Biases one
continuous run (docs/trackers.md) are kept here, next to the ledger, and every process reads them
before its Trainer's integrations start. One JSON object, replaced atomically, of sections:

- ``mlflow``: ``tracking_uri``, ``experiment_id``, ``run_id`` and ``params_logged`` (the run's
  parameters are logged by the first process only);
- ``wandb``: ``run_id``, ``project`` and ``dir`` (``WANDB_DIR``);
- ``logged_to``: the highest ``global_step`` the run's charts hold of the model's current line (the
  last logging step or file end written); a process that starts below it marks the steps above as undone;
- ``undone``: ``[first, last]`` step ranges that a rollback, a failed file or a crash took out of the
  model after they were logged, oldest first;
- ``registry``: ``tracking_uri`` and ``name`` of the MLflow registered model (``--register_model``), so
  that ``python -m daemon rollback`` can move its ``champion`` alias (:mod:`daemon.store.registry`).

Standard library only: the daemon and the rollback command read it without importing a tracker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from daemon.store.files import atomic_write_text

TRACKERS_FILE = "trackers.json"


def trackers_path(status_dir: str | Path) -> Path:
    """``<status_dir>/trackers.json``."""
    return Path(status_dir) / TRACKERS_FILE


def read_trackers(status_dir: str | Path) -> dict[str, Any]:
    """The recorded runs and registry; ``{}`` when none is recorded (or the file is unreadable: a new run starts)."""
    try:
        doc = json.loads(trackers_path(status_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def update_trackers(status_dir: str | Path, **sections: Any) -> dict[str, Any]:
    """Replace the given top-level sections (a None value removes one) and write the file atomically.

    Only the main training process (or the rollback command, which holds the folders' locks) writes,
    so a read-modify-write needs no lock.

    Returns:
        The whole record as written.
    """
    doc = read_trackers(status_dir)
    for key, value in sections.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    atomic_write_text(trackers_path(status_dir), json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return doc


def default_tracking_uri(status_dir: str | Path) -> str:
    """Where MLflow keeps runs when ``MLFLOW_TRACKING_URI`` is not set: ``sqlite:///<status_dir>/mlflow.db``.

    A SQLite store (not MLflow's ``./mlruns`` folder store) because the model registry needs a database.
    """
    return f"sqlite:///{Path(status_dir).resolve() / 'mlflow.db'}"
