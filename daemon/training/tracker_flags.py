"""``--register_model``: the MLflow model registry's flag (docs/trackers.md).

``--report_to mlflow`` / ``wandb`` are TrainingArguments' own flag; :mod:`daemon.training.trackers`
makes them one run across files.
"""

from __future__ import annotations

import importlib.util
import posixpath
from dataclasses import dataclass, field

from daemon.exceptions import ConfigError

TRACKERS_EXTRA = "pip install 'continual-daemon[trackers]'"


@dataclass
class TrackerArguments:
    """The MLflow model registry (``--report_to`` names the experiment trackers)."""

    register_model: str | None = field(
        default=None,
        metadata={
            "help": "Register every published export (after the quality gate) as a new version of this MLflow "
            "registered model, tagged with its global_step, files and evaluation, and point the alias 'champion' "
            "at it; a rollback moves the alias back. The store is MLFLOW_TRACKING_URI (default "
            "sqlite:///<status_dir>/mlflow.db). Needs the 'trackers' extra."
        },
    )

    def __post_init__(self) -> None:
        if self.register_model is not None and (why := model_name_problem(self.register_model)):
            raise ConfigError(f"--register_model {self.register_model!r}: {why}")
        if self.register_model and importlib.util.find_spec("mlflow") is None:
            raise ConfigError(f"--register_model needs mlflow, which is not installed: {TRACKERS_EXTRA}")


def model_name_problem(name: str) -> str | None:
    """Why MLflow's registry would refuse ``name`` as a registered model's name (one phrase), or None.

    MLflow's own rules (``mlflow.utils.validation._validate_model_name``, not imported here: importing mlflow
    takes seconds): no ``/`` or ``:``, and a name that stays itself as a path. Ours: not both kinds of quote, which
    :func:`daemon.store.registry.search_filter` could not quote.
    """
    if not name.strip():
        return "needs a name"
    if "/" in name or ":" in name:
        return "MLflow's registered model names cannot contain '/' or ':'"
    normalised = posixpath.normpath(name)
    if normalised != name or normalised == "." or normalised.startswith(".."):
        return f"MLflow refuses a name that would resolve to {normalised!r} as a path"
    if "'" in name and '"' in name:
        return "a name cannot hold both ' and \""
    return None


def missing_trackers(report_to: list[str] | str | None) -> list[str]:
    """The problems of ``--report_to``: each of ``mlflow`` / ``wandb`` asked for but not installed (one line each).

    The Trainer would otherwise fail with a traceback when it builds its callbacks.
    """
    names = report_to if isinstance(report_to, list) else [report_to] if report_to else []
    return [
        f"--report_to {name} needs {name}, which is not installed: {TRACKERS_EXTRA}"
        for name in ("mlflow", "wandb")
        if name in names and importlib.util.find_spec(name) is None
    ]
