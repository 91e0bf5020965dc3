"""Finding the checkpoint a run continues from (SPEC section 6).

A checkpoint is the folder ``<output_dir>/checkpoint-<global_step>`` written by
the Trainer. It is *complete* when it holds a readable ``trainer_state.json``,
the weights and the optimizer state; anything else is torn (killed mid-save,
disk full) and is never used: it is set aside as ``torn-checkpoint-<step>-<n>``
with a warning, so neither the Trainer's rotation nor a later save mixes it up
with good ones.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

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


def latest_complete_checkpoint(output_dir: str | Path, set_aside: bool = True) -> Checkpoint | None:
    """The newest complete checkpoint in ``output_dir``, or None if there is none.

    Newer incomplete checkpoints are skipped with a warning and, with
    ``set_aside``, renamed to ``torn-checkpoint-<step>[-n]`` so they can be inspected.

    Args:
        output_dir: where the Trainer writes ``checkpoint-<step>`` folders.
        set_aside: rename torn checkpoints out of the Trainer's way.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))),
        reverse=True,
    )
    for step, folder in found:
        reason = _why_incomplete(folder)
        if reason is None:
            state = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
            return Checkpoint(folder, int(state["global_step"]))
        logger.warning("skipping incomplete checkpoint %s: %s", folder.name, reason)
        if set_aside:
            _set_aside(folder, step)
    return None


def _set_aside(folder: Path, step: int) -> None:
    for n in range(1000):
        target = folder.with_name(f"torn-checkpoint-{step}" + (f"-{n}" if n else ""))
        if not target.exists():
            folder.rename(target)
            logger.warning("moved it to %s", target.name)
            return
