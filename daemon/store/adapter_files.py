"""What a LoRA line (``--use_peft``, :mod:`daemon.training.adapters`) keeps on disk, readable without torch.

A checkpoint of a LoRA line holds the adapter (``adapter_config.json``, ``adapter_model.safetensors``)
and its optimizer state, never the base weights; the base is the folder ``origin.json`` names
(:func:`adapter_base`). The export is the merged model, with the adapter in PEFT's format in
``adapter/`` beside it (:func:`save_export`, which calls only the model's own methods:
``merge_and_unload`` on a deep copy, ``save_pretrained``). :func:`switch_problem` is the one line
that refuses a change of kind, or of the adapter's settings, on a used ``output_dir``.

Standard library only at import time: the daemon process and ``python -m daemon rollback`` use it
without torch; :func:`merged_files_from_checkpoint` imports ``peft`` where a rollback needs it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.exceptions import CheckpointError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_FOLDER = "adapter"  # in the export: <output_dir>/adapter/
MERGED_PREFIX = "merged-lora-"  # a LoRA checkpoint replaced by its merge keeps this name, for the record
MERGING_PREFIX = ".merging-"  # the stage a merge writes its full checkpoint to: .merging-checkpoint-<step>
_STEP_FOLDER = re.compile(r"checkpoint-(\d+)")

logger = logging.getLogger(__name__)


def is_adapter_checkpoint(folder: str | Path) -> bool:
    """Whether a checkpoint (or export) folder holds a PEFT adapter rather than a whole model."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def adapter_config(folder: str | Path) -> dict[str, Any] | None:
    """The ``adapter_config.json`` of ``folder``, or None."""
    try:
        doc = json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def switch_problem(kind: str | None, config: dict[str, Any] | None, values: dict[str, Any]) -> str | None:
    """The one line that refuses a switch of training kind on a used ``output_dir``, or None.

    Args:
        kind: the latest checkpoint's kind (:func:`running_kind`), None for a new ``output_dir``.
        config: its adapter config when ``kind`` is ``"lora"``.
        values: the parsed flags (``use_peft``, the ``lora_*`` settings, ``merge_adapter``, ``output_dir``).
    """
    out = values["output_dir"]
    if values.get("merge_adapter"):  # on full checkpoints: merged already (a daemon passes it to every file)
        return f"--merge_adapter: {out} has no checkpoint to merge" if kind is None else None
    if kind == "full" and values["use_peft"]:
        return (
            f"{out} holds full fine-tuning checkpoints; --use_peft cannot continue them: drop --use_peft, or start "
            f"a new adapter on the exported model with --model_name_or_path {out} --output_dir <a new folder>"
        )
    if kind == "lora" and not values["use_peft"]:
        return (
            f"{out} holds a LoRA adapter (r={config.get('r') if config else '?'}); --use_peft false cannot continue "
            "it: drop that flag to continue the adapter, or pass --merge_adapter to merge it into the weights and "
            "continue in full fine-tuning"
        )
    for flag, key in (("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout")):
        if kind == "lora" and config is not None and values[flag] is not None and values[flag] != config.get(key):
            return (
                f"{out} holds a LoRA adapter of {key}={config.get(key)}; --{flag} {values[flag]} cannot continue it: "
                f"drop --{flag}, or pass --merge_adapter (without --use_peft) to merge it and continue in full "
                "fine-tuning"
            )
    given = values["lora_target_modules"]
    given = [given] if isinstance(given, str) else given
    if kind == "lora" and config is not None and given is not None and targets_differ(given, config):
        return (
            f"{out} holds a LoRA adapter of target_modules {_shown_targets(config.get('target_modules'))}; "
            f"--lora_target_modules {' '.join(given)} cannot continue it: drop --lora_target_modules, or pass "
            "--merge_adapter (without --use_peft) to merge it and continue in full fine-tuning"
        )
    return None


def _matches(module: str, target: str) -> bool:
    """Whether peft's list entry ``target`` names ``module``: the whole name, or its last dotted parts."""
    return module == target or module.endswith(f".{target}")


def targets_differ(given: list[str], config: dict[str, Any]) -> bool:
    """Whether ``--lora_target_modules`` names other modules than the adapter ``config`` was made on.

    peft stores a list as given (each entry names the modules whose name is it or ends in ``.<it>``), a
    regular expression as a string, and ``all-linear`` expanded into the full names of the linear layers it
    found. From files alone (no model), ``all-linear`` given equals such a list of full names, and a list
    given equals a stored list when each entry of either matches one of the other.
    """
    stored = config.get("target_modules")
    names = [str(name) for name in given]
    if isinstance(stored, str):
        same = len(names) == 1 and (names[0] == stored or names[0].lower() == stored.lower() == "all-linear")
        return not same
    if not isinstance(stored, list | tuple) or not stored:
        return False  # peft's other ways of choosing modules (target_parameters): nothing to compare
    modules = {str(name) for name in stored}
    if [name.lower() for name in names] == ["all-linear"]:
        return not all("." in module for module in modules)
    covered = all(any(_matches(module, name) for name in names) for module in modules)
    return not (covered and all(any(_matches(module, name) for module in modules) for name in names))


def _shown_targets(stored: Any) -> str:
    """The adapter's target modules in a message: their last names (``q_proj v_proj``), not one per layer."""
    if not isinstance(stored, list | tuple):
        return str(stored)
    return " ".join(sorted({str(name).rsplit(".", 1)[-1] for name in stored}))


def interrupted_merges(output_dir: str | Path) -> list[int]:
    """The steps of the ``--merge_adapter`` swaps a kill cut between their renames (:func:`finish_interrupted_merge`).

    Such a swap left its stage (``.merging-checkpoint-N``) and the adapter checkpoint under its kept name
    (``merged-lora-checkpoint-N``), no ``checkpoint-N`` and, the swap being the line's last act, no checkpoint
    above N (a ``merged-lora-`` folder whose ``checkpoint-N`` rotation removed later is not one).
    """
    root = Path(output_dir)
    names = {p.name for p in root.iterdir()} if root.is_dir() else set()
    saved = [int(m[1]) for name in names if (m := _STEP_FOLDER.fullmatch(name))]
    steps = [int(m[1]) for name in names if (m := _STEP_FOLDER.fullmatch(name.removeprefix(MERGING_PREFIX)))]
    return sorted(
        step for step in steps if f"{MERGED_PREFIX}checkpoint-{step}" in names and not any(s >= step for s in saved)
    )


def finish_interrupted_merge(output_dir: str | Path) -> list[int]:
    """Finish each ``--merge_adapter`` swap a kill cut between its two renames: the line continues from its step.

    The merge writes and commits its stage before the swap begins
    (:func:`daemon.training.adapters.merge_into_checkpoint`): a stage whole by its commit marker becomes
    ``checkpoint-N`` (the merge stands); any other (a stage of a version that committed it after the swap) is
    removed and the adapter checkpoint goes back to ``checkpoint-N`` (the next ``--merge_adapter`` merges again).
    Called by whatever owns the folders next, before it reads a checkpoint
    (:func:`daemon.store.rollback.finish_interrupted_work`); a no-op when nothing is pending.

    Returns:
        The steps finished.

    Raises:
        OSError: a folder cannot be renamed, and no other process of the job renamed it meanwhile.
    """
    from daemon.store.durable import COMMIT_FILE, commit_problem, fsync_dir

    root = Path(output_dir)
    steps = interrupted_merges(root)
    for step in steps:
        stage, kept, target = (root / f"{prefix}checkpoint-{step}" for prefix in (MERGING_PREFIX, MERGED_PREFIX, ""))
        if (stage / COMMIT_FILE).is_file() and commit_problem(stage) is None:
            _rename(stage, target)
            logger.warning("finished the interrupted merge of step %d: %s is the merged checkpoint", step, target.name)
        else:
            _rename(kept, target)
            shutil.rmtree(stage, ignore_errors=True)
            logger.warning("undid the interrupted merge of step %d: %s is the adapter again", step, target.name)
    if steps:
        fsync_dir(root)
    return steps


def _rename(source: Path, target: Path) -> None:
    """``source.rename(target)``; done already by another process of the job (``torchrun``) counts as done."""
    try:
        source.rename(target)
    except OSError:
        if source.exists() or not target.is_dir():
            raise


def adapter_base(output_dir: str | Path) -> str:
    """The base model folder of the adapter line in ``output_dir`` (``origin.json``).

    Raises:
        CheckpointError: no base is recorded, or its folder is gone.
    """
    from daemon.store.origin import read_origin

    origin = read_origin(output_dir)
    base = origin.get("base_model") if origin else None
    if not base or not (Path(base) / "config.json").is_file():
        raise CheckpointError(
            f"{output_dir} holds a LoRA adapter but its base model ({base or 'not recorded in origin.json'}) "
            "is not there: put the base folder back where it was"
        )
    return str(base)


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a ``peft`` model (without importing peft where it is not)."""
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def merged_copy(model: Any) -> PreTrainedModel:
    """A plain model equal to base + adapter: ``merge_and_unload`` on a deep copy, never on the training weights."""
    return copy.deepcopy(model).merge_and_unload()


def save_export(model: Any, folder: Path) -> None:
    """Write a PEFT model's export into a staging ``folder``: the merged model, and ``adapter/`` in PEFT's format."""
    merged = merged_copy(model)
    merged.config.use_cache = True
    merged.save_pretrained(folder, safe_serialization=True)
    del merged
    model.save_pretrained(folder / ADAPTER_FOLDER)


def card_section(folder: Path, base: str | None) -> str:
    """The model card's lines on the adapter of an export (``folder/adapter``), or "" when there is none."""
    config = adapter_config(folder / ADAPTER_FOLDER)
    if config is None:
        return ""
    targets = config.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else str(targets)
    return "\n".join(
        [
            "",
            "## LoRA adapter",
            "",
            "These weights are the base model with a LoRA adapter merged in (`peft`'s `merge_and_unload`);",
            f'`{ADAPTER_FOLDER}/` holds the adapter itself: `PeftModel.from_pretrained(base, "<this folder>/'
            f'{ADAPTER_FOLDER}")`.',
            "",
            "| | |",
            "|---|---|",
            f"| base model | `{base or config.get('base_model_name_or_path') or '?'}` |",
            f"| r / alpha / dropout | {config.get('r')} / {config.get('lora_alpha')} / {config.get('lora_dropout')} |",
            f"| target modules | {targets} |",
            "",
        ]
    )


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around a ``PeftModel``'s construction: peft (0.21) reads transformers 5's deprecated
    ``is_gradient_checkpointing`` there, and each LoRA file printed its ``FutureWarning`` into the log.
    That one warning only; any other still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def merged_files_from_checkpoint(checkpoint: Path, staged: Path, output_dir: Path) -> None:
    """Write the export of an adapter checkpoint into ``staged``: base + adapter merged, ``adapter/``, tokenizer.

    Used when a rollback returns the export to an adapter checkpoint (:func:`daemon.store.checkpoints.roll_back`),
    with no run's flags: the base's own code runs when the line was started with ``--trust_remote_code``
    (``origin.json``, :func:`daemon.store.origin.trusts_remote_code`).

    Raises:
        CheckpointError: the base model is gone, or the base or the adapter does not load.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from daemon.store.origin import ORIGIN_FILE, trusts_remote_code

    base_folder, trust = adapter_base(output_dir), trusts_remote_code(output_dir)
    try:
        base = AutoModelForCausalLM.from_pretrained(
            base_folder, local_files_only=True, dtype=torch.float32, trust_remote_code=trust
        )
        with peft_wrapping():
            adapted = PeftModel.from_pretrained(base, str(checkpoint))
    except (OSError, ValueError, KeyError) as e:
        remedy = (
            f'; its line does not record --trust_remote_code: add "trust_remote_code": true to '
            f"{Path(output_dir) / ORIGIN_FILE} if you trust the base's code, then run again"
            if not trust and "trust_remote_code" in str(e)
            else ""
        )
        raise CheckpointError(
            f"cannot rebuild the export from {checkpoint.name}: base {base_folder} with its adapter does not load "
            f"({str(e).strip().splitlines()[0]}){remedy}"
        ) from e
    save_export(adapted, staged)
    for path in checkpoint.iterdir():
        if path.name.startswith("tokenizer") or path.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy2(path, staged / path.name)


def checkpoint_kind(folder: Path) -> str:
    """``"lora"`` for an adapter checkpoint (``--use_peft``: the adapter and its optimizer state), else ``"full"``."""
    return "lora" if is_adapter_checkpoint(folder) else "full"


def add_card_section(staged: Path, root: Path) -> None:
    """Append the adapter's settings and base model to a staged export's card when it holds ``adapter/``."""
    from daemon.store.origin import read_origin

    section = card_section(staged, (read_origin(root) or {}).get("base_model"))
    if section:
        card = staged / "README.md"
        card.write_text(card.read_text(encoding="utf-8") + section, encoding="utf-8")
