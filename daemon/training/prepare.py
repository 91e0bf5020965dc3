"""The first phase of a file's run: scan and tokenize the file, pick the starting model, plan the steps.

:func:`setup` reads the ledger only and changes nothing on disk but the datasets cache, so a bad
file leaves everything as it was; it returns the :class:`~daemon.training.prepared.PreparedFile`
the run's later phases (:mod:`daemon.training.run`) work on.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from daemon.exceptions import (
    ConfigError,
    DatasetError,
)
from daemon.quality.forgetting import read_rows
from daemon.store.checkpoints import (
    latest_complete_checkpoint,
)
from daemon.store.jsonl import CHANGED_WHILE_READ, FileScan, load_records, scan_jsonl
from daemon.store.ledger import Ledger
from daemon.store.reconcile import refuse_missing_steps
from daemon.store.records import FileProgress, RunState
from daemon.store.replay import replay_count, select_rehearsal, select_replay
from daemon.store.replay_mix import select_weighted_replay
from daemon.store.status import Heartbeat, beat
from daemon.training.adapters import starting_model as adapted_starting_model
from daemon.training.arguments import Flags
from daemon.training.base_slice import base_slice_kept, keep_base_slice
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
from daemon.training.rehearsal import keep_rehearsal, rehearsal_due
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
    if base_slice_kept(status_dir) and not (
        rehearses(flags) and rehearsal_due(status_dir, flags.replay.replay_buffer_tokens)
    ):
        return False
    model, tokenizer = load_pretrained(folder, flags.model.trust_remote_code)
    rehearse_base(model, tokenizer, flags)
    autocast = autocast_dtype(flags.training.bf16, flags.training.fp16)
    keep_base_slice(model, tokenizer, status_dir, flags.data.max_seq_length, autocast)
    return True
