"""Checkpoints and the export: what a run continues from and what users load (README "Operating the daemon").

A checkpoint is the folder ``<output_dir>/checkpoint-<global_step>`` written by
the Trainer. It is *complete* when it holds a readable ``trainer_state.json``,
the weights and the optimizer state; anything else is torn (killed mid-save,
disk full) and is never used: it is set aside as ``torn-checkpoint-<step>-<n>``
with a warning, so neither the Trainer's rotation nor a later save mixes it up
with good ones.

The export is the model and tokenizer at the root of ``output_dir``, loadable with
``from_pretrained``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: its folder and the ``global_step`` in its trainer state."""

    path: Path
    global_step: int


def _why_incomplete(folder: Path) -> str | None:
    """None for a complete checkpoint, else what is missing or broken."""
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE}"
    try:
        json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (ValueError, KeyError) as e:
        return f"unreadable {TRAINER_STATE} ({type(e).__name__})"
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        return "no model weights"
    if not any((folder / name).is_file() for name in OPTIMIZER_FILES):
        return "no optimizer state"
    return None


def _checkpoint_folders(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-<step>`` folder, newest first."""
    if not root.is_dir():
        return []
    return sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))),
        reverse=True,
    )


def latest_complete_checkpoint(output_dir: str | Path, set_aside: bool = True) -> Checkpoint | None:
    """The newest complete checkpoint in ``output_dir``, or None if there is none.

    Newer incomplete checkpoints are skipped with a warning and, with ``set_aside``,
    moved out of the way by :func:`set_aside_torn_checkpoints`.

    Args:
        output_dir: where the Trainer writes ``checkpoint-<step>`` folders.
        set_aside: rename torn checkpoints; with False nothing on disk changes.
    """
    found = None
    for _, folder in _checkpoint_folders(Path(output_dir)):
        reason = _why_incomplete(folder)
        if reason is None:
            state = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
            found = Checkpoint(folder, int(state["global_step"]))
            break
        logger.warning("skipping incomplete checkpoint %s: %s", folder.name, reason)
    if set_aside:
        set_aside_torn_checkpoints(output_dir)
    return found


def set_aside_torn_checkpoints(output_dir: str | Path) -> None:
    """Rename incomplete checkpoints newer than the latest complete one to ``torn-checkpoint-<step>[-n]``.

    They stay for inspection, out of the Trainer's rotation and of later saves at the same step.
    """
    for step, folder in _checkpoint_folders(Path(output_dir)):
        if _why_incomplete(folder) is None:
            return
        for n in range(1000):
            target = folder.with_name(f"torn-checkpoint-{step}" + (f"-{n}" if n else ""))
            if not target.exists():
                folder.rename(target)
                logger.warning("moved the incomplete %s to %s", folder.name, target.name)
                break


def export_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output_dir: str | Path) -> None:
    """Save model and tokenizer to the root of ``output_dir``, loadable with ``from_pretrained``.

    Files are written to a temporary folder first and moved in one by one with
    ``os.replace``, so no file is ever half-written at its final name.
    """
    root = Path(output_dir)
    tmp = root / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for item in tmp.iterdir():
        os.replace(item, root / item.name)
    tmp.rmdir()
