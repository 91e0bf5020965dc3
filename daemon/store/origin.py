"""Where the running model came from: the embedded bootstrap, or a pretrained base model (no torch).

``<output_dir>/origin.json`` is written once, by the first run on an empty ``output_dir``, before
its first step: ``{"base_model": "<folder>"}`` for a run started from ``--model_name_or_path`` (or
from a model exported there without a checkpoint), ``{"base_model": null}`` for the bootstrapped
embedded model; a line started with ``--trust_remote_code`` on its base also records
``"trust_remote_code": true`` (a rollback loads that base without the run's flags). It is never
rewritten (a rollback keeps the model's line), so every later file, whatever flags it is given,
knows which defaults the model's line was started with (:func:`daemon.training.arguments.resolve_defaults`):
the learning rate and warmup must not change at a file boundary. An ``output_dir`` from before this
file existed has none: then a run counts as pretrained when it is given ``--model_name_or_path``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from daemon.store.files import atomic_write_text

ORIGIN_FILE = "origin.json"


def read_origin(output_dir: str | Path) -> dict[str, Any] | None:
    """The ``origin.json`` of ``output_dir``, or None when there is none (or it cannot be read)."""
    try:
        doc = json.loads((Path(output_dir) / ORIGIN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and "base_model" in doc else None


def base_model_of(output_dir: str | Path, model_name_or_path: str | None) -> str | None:
    """The pretrained folder the running model's line started from, or None for the embedded model.

    Args:
        output_dir: the running model's folder.
        model_name_or_path: ``--model_name_or_path`` as given (None when not given).

    Returns:
        ``origin.json``'s ``base_model`` when there is one; else ``model_name_or_path``; else
        ``output_dir`` when it holds an exported model but no checkpoint (a run starts from it);
        else None.
    """
    origin = read_origin(output_dir)
    if origin is not None:
        return origin["base_model"]
    if model_name_or_path:
        return model_name_or_path
    folder = Path(output_dir)
    has_checkpoint = any(p.name.startswith("checkpoint-") for p in folder.iterdir()) if folder.is_dir() else False
    return str(folder) if (folder / "config.json").is_file() and not has_checkpoint else None


def record_origin(output_dir: str | Path, base_model: str | None, trust_remote_code: bool = False) -> None:
    """Write ``origin.json`` unless one is there (module docstring); atomic.

    Args:
        output_dir: the running model's folder.
        base_model: the pretrained folder the line starts from, None for the embedded model.
        trust_remote_code: the line was started with ``--trust_remote_code`` on that base (recorded only when true).
    """
    if read_origin(output_dir) is None:
        doc: dict[str, Any] = {"base_model": base_model}
        if trust_remote_code and base_model is not None:
            doc["trust_remote_code"] = True
        atomic_write_text(Path(output_dir) / ORIGIN_FILE, json.dumps(doc) + "\n")


def trusts_remote_code(output_dir: str | Path) -> bool:
    """Whether the line in ``output_dir`` was started with ``--trust_remote_code`` (``origin.json``).

    What loads the base without a run's flags reads it: a rollback rebuilding a LoRA line's export
    (:func:`daemon.store.adapter_files.merged_files_from_checkpoint`).
    """
    return (read_origin(output_dir) or {}).get("trust_remote_code") is True


def has_own_chat_template(folder: str | Path) -> bool:
    """Whether a model folder's tokenizer carries a chat template of its own (``chat_template.jinja`` or in its config).

    The product's :data:`daemon.store.jsonl.DEFAULT_CHAT_TEMPLATE`, which the embedded tokenizer and a
    tokenizer without a template get, is not one (as :func:`daemon.training.snapshots.is_chat_model`).
    """
    from daemon.store.jsonl import DEFAULT_CHAT_TEMPLATE

    folder = Path(folder)
    template: object
    try:
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    except OSError:
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        template = config.get("chat_template") if isinstance(config, dict) else None
    return isinstance(template, str) and bool(template) and template != DEFAULT_CHAT_TEMPLATE
