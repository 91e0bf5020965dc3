"""Checkpoints and the export: what a run continues from and what users load (docs/operating.md).

A checkpoint is the folder ``<output_dir>/checkpoint-<global_step>`` written by
the Trainer. It is *complete* when its files match its commit marker (``commit.json``,
written last once the folder is fsynced: :mod:`daemon.store.durable`; a folder saved before the
marker existed has none), its ``trainer_state.json`` reads, its weights are whole (a
safetensors file as long as its header says; a LoRA adapter's beside a readable
``adapter_config.json``), and its optimizer and scheduler state are whole ``torch.save`` archives
(a zip directory that reads, listing no member beyond it), or for an FSDP checkpoint its shards'
metadata and config (:mod:`daemon.store.sharded_files`); anything else is torn (killed mid-save,
power loss, disk full) and is never used: it is set aside as ``torn-checkpoint-<step>[-n]`` with a
warning. The product commits each checkpoint after the Trainer saved it
(:func:`daemon.store.durable.commit_checkpoint`) and owns rotation (:func:`rotate_checkpoints`): by step
number, among complete checkpoints, never the newest complete one and never one a recorded plan still needs.

The export is the model and tokenizer at the root of ``output_dir``, loadable with
``from_pretrained``, and its model card ``README.md`` (:mod:`daemon.views.model_card`);
``export.json`` beside it names the step it holds.
:func:`roll_back` undoes the steps above a start: their checkpoints go, and the export
returns to the start (a failed file, or ``python -m daemon rollback``, :mod:`daemon.store.rollback`).
Standard library only: the daemon process uses it without torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.store import adapter_files as adapters
from daemon.store import sharded_files as sharded
from daemon.store.durable import COMMIT_FILE, commit_problem, folder_bytes, fsync_dir, make_durable
from daemon.store.export_snapshot import EXPORT_STATE, export_step, publishing
from daemon.store.files import atomic_write_text
from daemon.store.origin import ORIGIN_FILE
from daemon.views.model_card import write_card

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TORN_RE = re.compile(r"^torn-checkpoint-(\d+)(?:-\d+)?$")
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
SCHEDULER_FILE = "scheduler.pt"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",  # a LoRA checkpoint (--use_peft, daemon.training.adapters): the adapter only
    "adapter_model.bin",
)
# What an export consists of: a checkpoint's files but the training state.
EMA_FILE = "ema.safetensors"  # --average_exports ema's running average (daemon.training.ema): state, not the model
TRAINING_STATE_FILES = (TRAINER_STATE, *OPTIMIZER_FILES, SCHEDULER_FILE, "training_args.bin", EMA_FILE, COMMIT_FILE)


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: its folder and the ``global_step`` in its trainer state."""

    path: Path
    global_step: int


def _why_incomplete(folder: Path) -> str | None:
    """None for a complete checkpoint, else what is missing or broken (reads headers, not tensors).

    A committed folder (:mod:`daemon.store.durable`) must match its marker's file sizes first; every
    folder must then pass the format checks.
    """
    committed = commit_problem(folder)
    if committed is not None:
        return committed
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE}"
    try:
        json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (ValueError, KeyError) as e:
        return f"unreadable {TRAINER_STATE} ({type(e).__name__})"
    if sharded.is_sharded_checkpoint(folder):  # FSDP's shards (DCP folders) instead of weights and optimizer files
        problem = sharded.sharded_problem(folder)
        return problem or (None if _whole_zip(folder / SCHEDULER_FILE) else f"no whole {SCHEDULER_FILE}")
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        return "no model weights"
    if weights.name.endswith(".safetensors") and not _whole_safetensors(weights):
        return f"{weights.name} is truncated or empty"
    if weights.suffix == ".bin" and not zipfile.is_zipfile(weights):
        return f"{weights.name} is truncated or empty"
    if weights.name in adapters.ADAPTER_WEIGHT_FILES and adapters.adapter_config(folder) is None:  # peft reads it
        return f"no readable {adapters.ADAPTER_CONFIG}"
    optimizer = next((folder / name for name in OPTIMIZER_FILES if (folder / name).is_file()), None)
    if optimizer is None:
        return "no optimizer state"
    # Without the scheduler the Trainer silently skips optimizer and scheduler: warmup again.
    for part in (optimizer, folder / SCHEDULER_FILE):
        if not part.is_file():
            return f"no {part.name}"
        if not _whole_zip(part):  # torch.save writes a zip archive
            return f"{part.name} is truncated or empty"
    return None


def _whole_zip(path: Path) -> bool:
    """Whether a zip archive's directory reads and every member it lists lies before the directory.

    A torn archive lacks its end record; a damaged one lists members beyond its data. Reads the
    directory only, not the members.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            ends = [i.header_offset + 30 + len(i.orig_filename.encode()) + i.compress_size for i in archive.infolist()]
            return max(ends, default=0) <= archive.start_dir
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _whole_safetensors(path: Path) -> bool:
    """Whether a safetensors file is as long as its header says (format: 8-byte header size, JSON, data)."""
    try:
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
            size = os.fstat(f.fileno()).st_size
    except (OSError, struct.error, ValueError):
        return False
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    return size == 8 + header_size + max(ends, default=0)


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


def space_needed(output_dir: str | Path, with_export: bool, estimate: int = 0) -> int:
    """Bytes the next save in ``output_dir`` needs: the latest complete checkpoint's size, plus the export's.

    A checkpoint's size hardly changes from one save to the next (the same tensors).

    Args:
        output_dir: the running model's folder.
        with_export: an export follows the save (the end of a file).
        estimate: the checkpoint's bytes when none is complete yet (the weights and optimizer
            state in memory).

    Returns:
        Bytes.
    """
    latest = latest_complete_checkpoint(output_dir, set_aside=False)
    checkpoint = folder_bytes(latest.path) if latest is not None else estimate
    return checkpoint + (export_bytes(output_dir, estimate) if with_export else 0)


def export_bytes(output_dir: str | Path, estimate: int = 0) -> int:
    """Bytes the next export needs: the current export's, else the latest checkpoint's model files, else ``estimate``.

    The export is written beside the one it replaces (:func:`export_model`), so it needs its full size again.
    """
    root = Path(output_dir)
    if (root / "config.json").is_file():
        return sum(p.stat().st_size for p in _export_files(root))
    latest = latest_complete_checkpoint(root, set_aside=False)
    if latest is None:
        return estimate
    return sum(p.stat().st_size for p in _export_files(latest.path)) + sharded.shard_bytes(latest.path)


def checkpoint_usage(output_dir: str | Path) -> dict[str, Any]:
    """What the complete checkpoints of ``output_dir`` hold on disk, for the status's ``checkpoints``.

    Returns:
        ``{"steps": [...] (newest first), "bytes": all of them, "latest_bytes": the newest one's}``,
        in bytes. A rollback can return to any of ``steps`` that is a file boundary.
    """
    steps = complete_checkpoint_steps(output_dir)
    sizes = [folder_bytes(Path(output_dir) / f"checkpoint-{step}") for step in steps]
    kind = adapters.checkpoint_kind(Path(output_dir) / f"checkpoint-{steps[0]}") if steps else None
    return {"steps": steps, "bytes": sum(sizes), "latest_bytes": sizes[0] if sizes else 0, "kind": kind}


def complete_checkpoint_steps(output_dir: str | Path) -> list[int]:
    """The steps of the complete checkpoints in ``output_dir``, newest first; nothing on disk changes."""
    return [step for step, folder in _checkpoint_folders(Path(output_dir)) if _why_incomplete(folder) is None]


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


def rotate_checkpoints(output_dir: str | Path, keep: int | None, protected_steps: Iterable[int] = ()) -> list[int]:
    """Delete old checkpoints, by step number, keeping the ``keep`` newest complete ones.

    Replaces the Trainer's rotation, which orders by modification time: a clock stepped
    backwards there deletes the checkpoint just saved. Never deleted: the newest complete
    checkpoint, a checkpoint in ``protected_steps`` (the start of a recorded plan, a
    kept file boundary), and any incomplete ``checkpoint-*`` (torn ones are set aside by
    :func:`set_aside_torn_checkpoints`). Of the ``torn-checkpoint-<n>`` folders, the
    ``keep`` newest stay for inspection and older ones are deleted.

    Args:
        output_dir: the running model's folder.
        keep: complete checkpoints to keep (``--save_total_limit``); None or < 1 keeps all.
        protected_steps: steps whose checkpoints are kept whatever ``keep`` says.

    Returns:
        The steps of the deleted checkpoints.
    """
    root = Path(output_dir)
    complete = [(step, p) for step, p in _checkpoint_folders(root) if _why_incomplete(p) is None]
    if not complete:
        return []
    newest = complete[0][0]
    if keep is None or keep < 1:
        return []
    torn = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if (m := TORN_RE.match(p.name)) and p.is_dir()), reverse=True
    )
    for _, folder in torn[keep:]:  # the newest stay for inspection, within the same budget
        _delete_folder(folder)
    protected = set(protected_steps) | {newest}
    deleted = []
    for step, folder in complete[keep:]:
        if step not in protected:
            _delete_folder(folder)
            deleted.append(step)
    return deleted


def _delete_folder(folder: Path) -> None:
    """Delete a checkpoint folder so that a kill half-way never leaves a partial one under its name."""
    doomed = folder.with_name(f".deleting-{folder.name}")
    folder.rename(doomed)  # atomic: the checkpoint is gone from the Trainer's and our view at once
    shutil.rmtree(doomed, ignore_errors=True)


def roll_back(
    output_dir: str | Path, start_step: int, end_step: int | None = None, status_dir: str | Path | None = None
) -> list[int]:
    """Undo the steps ``start_step < step <= end_step``: the model is as it was at ``start_step``.

    The checkpoints of those steps are deleted (newest first, each atomically), then the
    export at the root returns to ``checkpoint-<start_step>`` when it holds a step inside
    the range (``export.json``). With ``end_step`` None every step above ``start_step`` is
    undone (a rollback to a file boundary), and the export becomes ``checkpoint-<start_step>``
    whatever step it held. Safe to repeat after a kill at any moment: a checkpoint is there
    whole or gone, and ``export.json`` names the new step only once the export is replaced.

    Args:
        output_dir: the running model's folder.
        start_step: the step the model returns to.
        end_step: the last step undone; None for all of them.
        status_dir: the status folder whose history the restored export's model card lists
            (:mod:`daemon.views.model_card`); None lists no files.

    Returns:
        The steps of the deleted checkpoints.
    """
    root = Path(output_dir)
    deleted = []
    for step, folder in _checkpoint_folders(root):
        if start_step < step and (end_step is None or step <= end_step):
            _delete_folder(folder)
            deleted.append(step)
    for leftover in root.glob(".deleting-checkpoint-*"):  # a kill during an earlier roll-back
        shutil.rmtree(leftover, ignore_errors=True)
    exported = export_step(root)
    if end_step is None:
        stale = exported != start_step
    else:
        stale = exported is not None and start_step < exported <= end_step
    if stale:
        start = root / f"checkpoint-{start_step}"
        if start_step > 0 and _why_incomplete(start) is None:
            _replace_export(root, start, start_step, status_dir)
        else:  # the model before the file was never exported: there is nothing to show
            _remove_export(root)
    if deleted:
        fsync_dir(root)
        logger.warning("rolled back to step %d: deleted checkpoints %s", start_step, deleted)
    return deleted


def export_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | Path,
    global_step: int,
    cooldown_steps: int = 0,
    status_dir: str | Path | None = None,
    finishing: dict[str, Any] | None = None,
    averaged: dict[str, Any] | None = None,
) -> None:
    """Save model, tokenizer and model card to the root of ``output_dir``, loadable with ``from_pretrained``.

    ``export.json`` holds ``global_step`` (the main line's step the model comes from) and,
    for a cooled model (:mod:`daemon.training.cooldown`), the ``cooldown_steps`` of its branch; for an
    averaged one, ``averaged`` (:func:`daemon.training.averaging.average_export`: what it averages).

    Written to a staging folder and fsynced first, then moved in file by file
    (``os.replace``): no file is ever half-written at its final name, files of the
    previous export that the new one lacks (stale shards) are removed, and
    ``export.json`` is replaced last. A reader that loads while an export is being
    moved in (milliseconds) could see files of two steps: the install holds the marker
    ``.export.publishing`` until ``export.json`` names the new step, and one that fails
    part-way leaves it (:func:`daemon.store.export_snapshot.publishing`); a reader takes
    the export only while the marker is absent and the files do not change
    (:func:`daemon.store.export_snapshot.snapshot_export`).

    Args:
        model, tokenizer: what to save.
        output_dir: the running model's folder.
        global_step: the step the model holds (``export.json``, the card).
        status_dir, finishing: the training history the model card lists and the done row
            of the file being saved, not yet in it (:func:`daemon.views.model_card.write_card`).
    """
    root = Path(output_dir)
    staged = _empty_stage(root)
    # The Trainer turns the KV cache off for training (TrainingArguments.use_cache is False in
    # transformers 5) and the config is saved as it is: an export is for inference, with the cache.
    if adapters.is_peft_model(model):  # a LoRA line: the merged model at the root, the adapter in adapter/
        adapters.save_export(model, staged)
    else:
        model.config.use_cache = True
        model.save_pretrained(staged, safe_serialization=True)  # straight into the stage: no second copy
    tokenizer.save_pretrained(staged)
    write_card(staged, global_step, status_dir, root.resolve().name, finishing, root)  # in the stage: moved in with it
    adapters.add_card_section(staged, root)
    _install_stage(root, staged, global_step, {"cooldown_steps": cooldown_steps, **(averaged or {})})


def _export_files(folder: Path) -> list[Path]:
    return [
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.name not in (*TRAINING_STATE_FILES, EXPORT_STATE, ORIGIN_FILE)  # origin.json: the line's, not an export's
        and not p.name.startswith("rng_state")
    ]


def _replace_export(root: Path, source: Path, global_step: int, status_dir: str | Path | None) -> None:
    """Make the export at ``root`` a copy of the model files of ``source`` (a checkpoint), with its card."""
    staged = _empty_stage(root)
    if adapters.is_adapter_checkpoint(source):  # a LoRA line's export is base + adapter merged (torch, peft)
        adapters.merged_files_from_checkpoint(source, staged, root)
    else:
        for path in _export_files(source):
            shutil.copy2(path, staged / path.name)
        if sharded.is_sharded_checkpoint(source):  # FSDP's shards: consolidated beside the config (accelerate)
            sharded.merge_weights(source, staged)
    write_card(staged, global_step, status_dir, root.resolve().name, output_dir=root)
    adapters.add_card_section(staged, root)
    _install_stage(root, staged, global_step)


def _empty_stage(root: Path) -> Path:
    """``<root>/.export.staged``, empty: where the next export is written before it is moved in."""
    staged = root / ".export.staged"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    return staged


def _install_stage(root: Path, staged: Path, global_step: int, made: dict[str, Any] | None = None) -> None:
    """Move the staged export in (fsynced first, ``config.json`` last), remove stale files, then ``export.json``."""
    make_durable(staged)
    old = {p.name for p in _export_files(root)} if (root / "config.json").is_file() else set()
    new = {p.name for p in staged.iterdir()}
    with publishing(root):  # readers that load meanwhile (python -m daemon serve) wait for export.json
        for name in sorted(new, key=lambda n: n == "config.json"):  # config.json last: it makes a folder a model
            if (staged / name).is_dir():  # adapter/ (a LoRA line): a folder cannot replace a folder in one rename
                shutil.rmtree(root / name, ignore_errors=True)
            os.replace(staged / name, root / name)
        for name in old - new:
            (root / name).unlink(missing_ok=True)
        if adapters.ADAPTER_FOLDER not in new:  # an export without adapter (after --merge_adapter) leaves none
            shutil.rmtree(root / adapters.ADAPTER_FOLDER, ignore_errors=True)
        staged.rmdir()
        _write_export_state(root, global_step, made or {})


def _remove_export(root: Path) -> None:
    with publishing(root):
        (root / "config.json").unlink(missing_ok=True)  # first: without it the folder is no model
        for path in _export_files(root):
            path.unlink(missing_ok=True)
        shutil.rmtree(root / adapters.ADAPTER_FOLDER, ignore_errors=True)
        (root / EXPORT_STATE).unlink(missing_ok=True)


def _write_export_state(root: Path, global_step: int, made: dict[str, Any]) -> None:
    state = {"global_step": global_step, **{key: value for key, value in made.items() if value}}  # a branch's
    atomic_write_text(root / EXPORT_STATE, json.dumps(state) + "\n")
    fsync_dir(root)
