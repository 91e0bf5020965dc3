"""The MLflow model registry (``--register_model NAME``): one model version per published export.

After a done file is published (past the quality gate), :func:`register_export` adds a version of the
registered model ``NAME`` whose source is the export folder, tagged with what identifies it:
``global_step``, ``files`` (the done files in its weights, oldest first), ``weights_sha256`` (of the
export's ``model.safetensors``, so a later export in the same folder is told apart), the file's
evaluation (``eval_loss``, ``forgetting_mean``, ``quality_gate_regression``, and ``evaluation``: every
scalar of the suite as JSON) and ``cooldown_steps``. The alias ``champion`` then points at it.

A rollback to step N (:func:`roll_back_champion`, from :mod:`daemon.store.rollback`) deletes no version:
the versions above N are tagged ``rolled_back`` and ``champion`` moves back to the newest version of
step N (or is removed when none was registered at N). A push to a hub would be one more consumer of the
same (folder, step, tags): see docs/trackers.md.

Here in ``store/`` because the rollback command, which never imports torch, moves the alias; mlflow is
imported only inside these functions, so nothing pays for it unless ``--register_model`` was given.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from daemon.store.trackers import read_trackers, update_trackers

logger = logging.getLogger(__name__)

CHAMPION = "champion"
# MLflow's limit on a tag value is larger (8000 characters in MLflow 3); lists are cut to this from their start.
MAX_TAG_CHARS = 4000


def register_export(
    status_dir: str | Path,
    tracking_uri: str,
    name: str,
    export_dir: str | Path,
    step: int,
    tags: dict[str, Any],
    run_id: str | None = None,
) -> str:
    """Register the export at ``export_dir`` (the model of ``step``) as a new version of ``name``; alias it champion.

    Repeating it for the same step (a crash between the export and the history row) finds the version
    already there and registers none. The registry is recorded in ``trackers.json`` for the rollback.

    Args:
        status_dir: the status folder (``trackers.json``).
        tracking_uri: the MLflow tracking (and registry) store, e.g. ``sqlite:///status/mlflow.db``.
        name: the registered model's name.
        export_dir: the exported model's folder.
        step: its ``global_step``.
        tags: what else identifies it (files, evaluation); values become strings.
        run_id: the MLflow run the model comes from, or None.

    Returns:
        The version (a string, as MLflow numbers them).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    update_trackers(status_dir, registry={"tracking_uri": tracking_uri, "name": name})
    try:
        client.create_registered_model(name, description="Every published export of the continual-training daemon.")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    standing = [v for v in _versions(client, name) if v.tags.get("global_step") == str(step)]
    standing = [v for v in standing if "rolled_back" not in v.tags]
    if standing:
        version = str(max(int(v.version) for v in standing))
    else:
        weights = Path(export_dir) / "model.safetensors"
        all_tags = {"global_step": step, **tags}
        if weights.exists():
            all_tags["weights_sha256"] = _sha256(weights)
        source = str(Path(export_dir).resolve())
        created = client.create_model_version(name, source, run_id=run_id, tags=_strings(all_tags))
        version = str(created.version)
    client.set_registered_model_alias(name, CHAMPION, version)
    logger.info("registered the export of step %d as %s version %s (%s)", step, name, version, CHAMPION)
    return version


def roll_back_champion(status_dir: str | Path, to_step: int) -> None:
    """After a rollback to ``to_step``: tag later versions ``rolled_back``, move ``champion`` back; delete none.

    A no-op when no registry is recorded in ``trackers.json``. Safe to repeat (a rollback finished
    after a kill). Errors are logged, never raised: the rollback itself is done by now.
    """
    registry = read_trackers(status_dir).get("registry")
    if not registry:
        return
    try:
        from mlflow import MlflowClient

        uri, name = registry["tracking_uri"], registry["name"]
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        versions = _versions(client, name)
        for v in versions:
            if int(v.tags.get("global_step", -1)) > to_step and "rolled_back" not in v.tags:
                client.set_model_version_tag(name, v.version, "rolled_back", str(to_step))
        back = [v for v in versions if v.tags.get("global_step") == str(to_step) and v.tags.get("rolled_back") is None]
        if back:
            version = str(max(int(v.version) for v in back))
            client.set_registered_model_alias(name, CHAMPION, version)
            logger.info("registry %s: %s is version %s again (step %d)", name, CHAMPION, version, to_step)
        else:
            client.delete_registered_model_alias(name, CHAMPION)
            logger.warning("registry %s: no version holds step %d; the %s alias is removed", name, to_step, CHAMPION)
    except Exception:  # a registry that cannot be reached must not undo a finished rollback
        logger.exception("could not move the %s alias of the model registry back to step %d", CHAMPION, to_step)


def _versions(client: Any, name: str) -> list[Any]:
    return list(client.search_model_versions(search_filter(name)))


def search_filter(name: str) -> str:
    """MLflow's search filter for the versions of ``name``: quoted with ``'``, or ``"`` where the name holds a ``'``
    (MLflow's filter grammar has no escape; ``--register_model`` refuses a name with both)."""
    quote = '"' if "'" in name else "'"
    return f"name = {quote}{name}{quote}"


def _strings(tags: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in tags.items():
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        out[key] = text if len(text) <= MAX_TAG_CHARS else "..." + text[-(MAX_TAG_CHARS - 3) :]
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
