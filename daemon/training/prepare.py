"""The first phase of a file's run: scan and tokenize the file, pick the starting model, plan the steps.

:func:`setup` reads the ledger only and changes nothing on disk but the datasets cache and, before a pretrained
line's first step, the base model's kept answers (:func:`rehearse_base`), so a bad file leaves the model's line as
it was; it returns the :class:`~daemon.training.prepared.PreparedFile`
the run's later phases (:mod:`daemon.training.run`) work on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from daemon.exceptions import (
    ConfigError,
    DatasetError,
)
from daemon.pretrained import TOKENIZER_FILES
from daemon.quality.forgetting import read_rows, write_rows
from daemon.store.checkpoints import (
    latest_complete_checkpoint,
)
from daemon.store.files import atomic_write_text
from daemon.store.jsonl import CHANGED_WHILE_READ, FileScan, load_records, scan_jsonl
from daemon.store.ledger import Ledger
from daemon.store.origin import read_origin
from daemon.store.reconcile import refuse_missing_steps
from daemon.store.records import FileProgress, RunState
from daemon.store.replay import replay_count, select_rehearsal, select_replay
from daemon.store.replay_mix import select_weighted_replay
from daemon.store.status import Heartbeat, beat
from daemon.store.suite import BASE_FILE, slice_name
from daemon.training.adapters import starting_model as adapted_starting_model
from daemon.training.arguments import Flags
from daemon.training.base_slice import base_slice_kept, base_slice_path, keep_base_slice
from daemon.training.cooldown import cooldown_steps
from daemon.training.data import (
    PreparedData,
    mix_replay,
    prepare_datasets,
    tokenizer_fingerprint,
)
from daemon.training.distillation import trained_start
from daemon.training.evaluation import autocast_dtype
from daemon.training.model import load_pretrained, own_trainable_memory, pretrained_start
from daemon.training.plan import plan_steps, recorded_plan
from daemon.training.prepared import PreparedFile
from daemon.training.rehearsal import keep_rehearsal, rehearsal_due, rehearsal_path
from daemon.training.sharding import refuse_checkpoint, refuse_unsupported

logger = logging.getLogger(__name__)


def setup(flags: Flags, ledger: Ledger, heartbeat: Heartbeat | None) -> PreparedFile:
    """Scan and tokenize the file, pick the starting model and plan the steps; reads the ledger only.

    Raises:
        DatasetError, CheckpointError, ConfigError, TrainingError.
    """
    data_args, training_args = flags.data, flags.training
    assert data_args.dataset is not None
    refuse_unsupported(flags)  # under FSDP: what cannot run sharded, before the file is read
    scan = scan_jsonl(data_args.dataset, data_args.text_field, data_args.strict)
    claim = ledger.get(flags.status.ledger_id) if flags.status.ledger_id is not None else None
    if claim is not None and claim.sha256 is not None and claim.sha256 != scan.sha256:
        raise DatasetError(
            f"{scan.path.name} changed after the daemon claimed it (sha256 {claim.sha256[:12]}... then, "
            f"{scan.sha256[:12]}... now): {CHANGED_WHILE_READ.split(': ', 1)[1]}"
        )
    beat(heartbeat, state=RunState.TOKENIZING)
    records = load_records(scan, data_args)
    output_dir = str(training_args.output_dir)
    checkpoint = latest_complete_checkpoint(output_dir, set_aside=False)
    refuse_missing_steps(ledger, output_dir, claim)
    refuse_checkpoint(training_args, checkpoint)
    model, tokenizer, checkpoint = adapted_starting_model(flags, checkpoint, records, scan.shape)  # --use_peft
    if training_args.device.type == "cpu":
        own_trainable_memory(model)  # not the loaded file's pages: the first optimizer step would fault each one
    datasets = prepare_datasets(records, scan.shape, tokenizer, data_args, training_args.seed)
    at_step = checkpoint.global_step if checkpoint else 0
    resumed, abandoned = recorded_plan(ledger, scan, at_step, claim)
    start_step = at_step if resumed is None or resumed.start_step is None else resumed.start_step
    if checkpoint is None:  # before the first file's replay is drawn: it rehearses too
        forget_stale_base_answers(flags)
        rehearse_base(model, tokenizer, flags)
    datasets = with_replay(datasets, flags, scan, start_step, tokenizer)
    plan = plan_steps(start_step, datasets.examples, training_args, datasets.replayed)
    if resumed and (plan.planned_steps, plan.replayed_examples) != (
        resumed.planned_steps,
        resumed.replayed_examples or 0,
    ):
        raise ConfigError(
            f"{scan.path.name} was planned with {resumed.planned_steps} steps ({resumed.replayed_examples or 0} "
            f"replayed examples) and is half trained; these flags give {plan.planned_steps} "
            f"({plan.replayed_examples}): resume it with the batch, epoch and replay flags it started with"
        )
    steps_done = at_step - plan.start_step
    if resumed:
        logger.info("resuming %s at step %d of its plan %d -> %d", scan.path.name, at_step, start_step, plan.max_steps)
    progress = FileProgress(
        name=scan.path.name,
        sha256=scan.sha256,
        examples=datasets.examples,
        eval_examples=datasets.eval_examples,
        tokens=datasets.tokens,
        skipped_lines=scan.bad_lines,
        start_step=plan.start_step,
        planned_steps=plan.planned_steps,
        steps_done=steps_done,
        replayed_examples=plan.replayed_examples,
        replayed_tokens=datasets.replayed_tokens,
        cooldown_steps=cooldown_steps(plan.planned_steps, flags.replay.cooldown_fraction),
    )
    weight = flags.techniques.replay_loss_weight
    weighed = f" (each weighing {weight:g} in the loss)" if datasets.replayed and weight != 1 else ""
    logger.info(
        "%s: %s, %d train examples (%d tokens) + %d replayed%s, %d held out; effective batch %d = %d x %d x world %d; "
        "steps %d -> %d (%d for this file)",
        scan.path.name,
        scan.shape,
        datasets.examples,
        datasets.tokens,
        datasets.replayed,
        weighed,
        datasets.eval_examples,
        plan.effective_batch,
        plan.per_device_train_batch_size,
        plan.gradient_accumulation_steps,
        plan.world_size,
        plan.start_step,
        plan.max_steps,
        plan.planned_steps,
    )
    return PreparedFile(model, tokenizer, datasets, scan, checkpoint, plan, steps_done, resumed, abandoned, progress)


def with_replay(
    datasets: PreparedData, flags: Flags, scan: FileScan, start_step: int, tokenizer: PreTrainedTokenizerBase
) -> PreparedData:
    """Mix ``--replay_fraction`` of replayed examples into the file's training examples (:mod:`daemon.store.replay`).

    The selection reads the shares of files done up to ``start_step`` (the ledger plan's, for a
    resumed file) and is seeded by ``--seed``, the file's sha256 and ``start_step``: a resumed
    file replays the same examples in the same order. With ``--replay_weighting forgetting`` the
    same number is split over the files by their forgetting in the evaluation rows up to
    ``start_step`` (:func:`daemon.store.replay_mix.select_weighted_replay`), which a crash inside
    the file does not change either. With ``--base_rehearsal``, ``--base_rehearsal_fraction`` of
    the base model's own answers (:mod:`daemon.training.rehearsal`) are mixed in beside the replay,
    seeded the same way; both count as the plan's replayed examples, and both weigh
    ``--replay_loss_weight`` in the loss (:mod:`daemon.training.loss_weights`). The rows' weights of the
    distillation terms (:mod:`daemon.training.distillation`) are set here too, replayed or not.
    """
    replay, seed, status_dir = flags.replay, flags.training.seed, flags.status.status_dir
    own = flags.techniques.file_distillation if trained_start(flags, start_step) else 0.0
    count = replay_count(datasets.examples, replay.replay_fraction)
    rehearsed = replay_count(datasets.examples, replay.base_rehearsal_fraction) if replay.base_rehearsal else 0
    if count == 0 and rehearsed == 0:
        return mix_replay(datasets, [], seed, file_distillation=own)
    fingerprint, draw_seed = tokenizer_fingerprint(tokenizer), f"{seed}:{scan.sha256}:{start_step}"
    rehearsal = select_rehearsal(status_dir, rehearsed, f"{draw_seed}:rehearsal", fingerprint)
    if rehearsal:
        logger.info("rehearsing %d of the base model's own answers beside the file's replay", len(rehearsal))
    loss_weight, distillation = flags.techniques.replay_loss_weight, flags.techniques.replay_distillation
    if flags.techniques.replay_weighting == "forgetting":  # per file, by its forgetting up to start_step
        rows = read_rows(status_dir)
        chosen, weights = select_weighted_replay(status_dir, start_step, count, draw_seed, fingerprint, rows)
        mixed = mix_replay(datasets, chosen + rehearsal, seed, loss_weight, distillation, own)
        return replace(mixed, replay_weights=weights)
    chosen = select_replay(status_dir, start_step, count, draw_seed, fingerprint)
    return mix_replay(datasets, chosen + rehearsal, seed, loss_weight, distillation, own)


def rehearse_base(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, flags: Flags) -> None:
    """On a pretrained start, keep the base model's answers as the replay share at step 0
    (:mod:`daemon.training.rehearsal`).

    The main process writes it first; the others then find it, so every rank draws the same replay.
    """
    replay, training = flags.replay, flags.training
    if flags.base_model() is None or not rehearses(flags):
        return
    with training.main_process_first(local=False, desc="the base model's rehearsal answers"):
        keep_rehearsal(
            model,
            tokenizer,
            flags.status.status_dir,
            flags.data.max_seq_length,
            replay.replay_buffer_tokens,
            tokenizer_fingerprint(tokenizer),
            autocast_dtype(training.bf16, training.fp16),
        )


def rehearses(flags: Flags) -> bool:
    """Whether the line rehearses its base model's answers (``--base_rehearsal``, a fraction above 0)."""
    return bool(flags.replay.base_rehearsal) and flags.replay.base_rehearsal_fraction > 0


def prepare_idle_line(flags: Flags) -> bool:
    """Before a pretrained line's first file (the daemon's spare, while the inbox is idle): keep what its base knew.

    The first file of a line started from ``--model_name_or_path`` writes the base model's rehearsal
    answers (:func:`rehearse_base`) and its slice with the step-0 row (:func:`~daemon.training.base_slice.
    keep_base_slice`): about 12 s for SmolLM2-135M on 2 cores, paid between the drop and the file's first
    step. The daemon's prestarted process (``--prestart``) does both here while nothing waits, from the
    model the first file will load and at its precision; both are kept once per status folder, so the
    file finds them and goes straight to its steps. A spare killed meanwhile leaves whole files or none
    (each is written atomically; a slice without its row is scored again).

    Returns:
        True when the model was loaded and both kept; False when there is nothing to do: a complete
        checkpoint exists (the line has started), the line bootstraps the embedded model, or both are
        kept already (a daemon restarted before the first file).

    Raises:
        CheckpointError: the base folder does not load (the first file will fail with the same line).
    """
    output_dir, base = str(flags.training.output_dir), flags.base_model()
    folder = pretrained_start(flags.model, output_dir)
    if base is None or folder is None or latest_complete_checkpoint(output_dir, set_aside=False) is not None:
        return False
    status_dir = flags.status.status_dir
    forget_stale_base_answers(flags)
    if base_slice_kept(status_dir) and not (
        rehearses(flags) and rehearsal_due(status_dir, flags.replay.replay_buffer_tokens)
    ):
        return False
    model, tokenizer = load_pretrained(folder, flags.model.trust_remote_code)
    rehearse_base(model, tokenizer, flags)
    autocast = autocast_dtype(flags.training.bf16, flags.training.fp16)
    keep_base_slice(model, tokenizer, status_dir, flags.data.max_seq_length, autocast)
    return True


BASE_ANSWERS_FILE = "base_answers.json"  # in the status folder: what the kept answers were made from
# The files of a model folder that make its answers (weights, config, tokenizer, generation settings): a lock or
# status file written beside an exported model is not one.
MODEL_SUFFIXES = {".safetensors", ".bin", ".gguf", ".pt", ".pth"}
MODEL_FILES = {
    "config.json",
    "generation_config.json",
    *TOKENIZER_FILES,
    "special_tokens_map.json",
    "chat_template.jinja",
    "merges.txt",
}


def base_answers_source(flags: Flags, folder: str) -> dict[str, Any]:
    """What the base model's kept answers (the rehearsal share, the base-model slice and its step-0 row) depend on.

    Args:
        flags: the precision (``--bf16``, ``--fp16``), ``--max_seq_length`` and ``--replay_buffer_tokens``.
        folder: the pretrained folder a line's first file loads (:func:`~daemon.training.model.pretrained_start`).

    Returns:
        A JSON-ready ``{"base_model", "files", "precision", "max_seq_length", "replay_buffer_tokens"}``: the folder's
        absolute path and the name, size and modification time (ns) of each of its model files
        (:data:`MODEL_FILES`, :data:`MODEL_SUFFIXES`), so a model written again into the same folder is another source.
    """
    root = Path(folder)
    files = (
        sorted(p for p in root.iterdir() if p.is_file() and (p.suffix in MODEL_SUFFIXES or p.name in MODEL_FILES))
        if root.is_dir()
        else []
    )
    precision = autocast_dtype(flags.training.bf16, flags.training.fp16)
    return {
        "base_model": str(root.resolve()) if root.is_dir() else folder,
        "files": [[p.name, (stat := p.stat()).st_size, stat.st_mtime_ns] for p in files],
        "precision": str(precision).removeprefix("torch.") if precision is not None else "float32",
        "max_seq_length": flags.data.max_seq_length,
        "replay_buffer_tokens": flags.replay.replay_buffer_tokens,
    }


def forget_stale_base_answers(flags: Flags) -> None:
    """Before a pretrained line's first step: drop the base model's answers kept from another source.

    The daemon's idle spare (:func:`prepare_idle_line`) or an earlier attempt at the first file may have kept them
    from another base model, precision or sequence length (a daemon restarted with other flags before its first
    file); they are kept once per status folder, so the line would rehearse and measure drift against that other
    model's answers. Where :data:`BASE_ANSWERS_FILE` does not match :func:`base_answers_source`, the rehearsal
    share, the base-model slice and its rows are removed, to be made again, and the file is rewritten. Once the
    line has started (``origin.json``) nothing changes: its base is fixed and its answers with it. The main process
    first; the others then find the file current.
    """
    output_dir = str(flags.training.output_dir)
    folder = pretrained_start(flags.model, output_dir)  # without origin.json, the line's base (Flags.base_model)
    if folder is None or read_origin(output_dir) is not None:
        return
    status_dir = flags.status.status_dir
    with flags.training.main_process_first(local=False, desc="the base model's kept answers"):
        record, source = Path(status_dir) / BASE_ANSWERS_FILE, base_answers_source(flags, folder)
        try:
            kept = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            kept = None
        if kept == source:
            return
        name, rows = slice_name(0, BASE_FILE), read_rows(status_dir)
        stale = [p for p in (rehearsal_path(status_dir), base_slice_path(status_dir)) if p.is_file()]
        if stale or any(row["slice"] == name for row in rows):
            logger.warning(
                "the base model's answers kept in %s were made from another base model, precision or length "
                "than %s at %s: they are made again",
                status_dir,
                source["base_model"],
                source["precision"],
            )
            for path in stale:
                path.unlink()
            write_rows(status_dir, -1, [row for row in rows if row["slice"] != name])
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(source) + "\n")
