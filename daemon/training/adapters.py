"""LoRA adapters that keep learning: one PEFT adapter trained across the whole stream (docs/lora.md).

``--use_peft`` (TRL's flag names: ``--lora_r``, ``--lora_alpha``, ``--lora_dropout``,
``--lora_target_modules``) wraps the base model in a ``peft`` LoRA adapter on the first file
(:func:`attach_adapter`, ``get_peft_model``); every later file loads the base named by
``origin.json`` (:mod:`daemon.store.origin`) and the adapter of the latest checkpoint
(:func:`starting_model`, ``PeftModel.from_pretrained(..., is_trainable=True)``), and the Trainer
resumes the adapter's optimizer and scheduler state from the same checkpoint. A checkpoint holds
the adapter (``adapter_model.safetensors``, ``adapter_config.json``), its optimizer and scheduler
state and the tokenizer: the base weights are never copied, never changed.

What a LoRA line keeps on disk, its export (:func:`daemon.store.adapter_files.save_export`: the model
merged by ``merge_and_unload`` on a copy, the training weights stay unmerged, and ``adapter/``)
and the refusal of a switch are in :mod:`daemon.store.adapter_files`, which the daemon process and
the checkpoint code read without torch. This module is the training side: the flags, the
adapter's creation and loading, and the explicit switch.

Switching kind on a used ``output_dir`` is refused (:func:`resolve_peft`) unless asked for:
``--merge_adapter`` merges the latest adapter checkpoint into the base weights
(:func:`merge_into_checkpoint`) and the file continues in full fine-tuning at the same step.

``peft`` and ``torch`` are imported inside the functions that need them (the daemon process checks
flags through :func:`resolve_peft` without them).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.exceptions import CheckpointError, ConfigError
from daemon.store.adapter_files import (
    MERGED_PREFIX,
    MERGING_PREFIX,
    adapter_base,
    is_adapter_checkpoint,
    peft_wrapping,
)
from daemon.training.peft_flags import PeftArguments

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from daemon.store.checkpoints import Checkpoint
    from daemon.training.arguments import Flags

logger = logging.getLogger(__name__)


def starting_model(
    flags: Flags, checkpoint: Checkpoint | None, records: datasets.Dataset, shape: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Checkpoint | None]:
    """The model a file starts from, with its adapter when ``--use_peft``.

    Without it, :func:`daemon.training.model.starting_model`'s.

    Returns:
        ``(model, tokenizer, checkpoint)``: ``checkpoint`` is the one to resume from (after
        ``--merge_adapter``, the merged full checkpoint at the same step).

    Raises:
        CheckpointError: the base model or the adapter cannot be loaded.
    """
    from daemon.training.model import load_pretrained
    from daemon.training.model import starting_model as plain_starting_model

    output_dir = str(flags.training.output_dir)
    if checkpoint is not None and flags.peft.merge_adapter and is_adapter_checkpoint(checkpoint.path):
        checkpoint = merge_into_checkpoint(flags, checkpoint)
    if checkpoint is not None and is_adapter_checkpoint(checkpoint.path):
        from peft import PeftModel

        base, _ = load_pretrained(adapter_base(output_dir), flags.model.trust_remote_code)
        _, tokenizer = load_pretrained_tokenizer(checkpoint.path, flags)
        logger.info("continuing the LoRA adapter of %s (global_step %d)", checkpoint.path, checkpoint.global_step)
        with peft_wrapping():
            adapted = PeftModel.from_pretrained(base, str(checkpoint.path), is_trainable=True)
        return adapted, tokenizer, checkpoint  # type: ignore[return-value]  # a PeftModel serves as the model
    model, tokenizer = plain_starting_model(flags.model, output_dir, flags.training.seed, checkpoint, records, shape)
    if flags.peft.use_peft and checkpoint is None:
        model = attach_adapter(model, flags.peft)
    return model, tokenizer, checkpoint


def load_pretrained_tokenizer(folder: Path, flags: Flags) -> tuple[None, PreTrainedTokenizerBase]:
    """The tokenizer a checkpoint holds (the Trainer saves its ``processing_class`` there), completed as on load."""
    from transformers import AutoTokenizer

    from daemon.store.jsonl import DEFAULT_CHAT_TEMPLATE

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=flags.model.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer of {folder}: {str(e).splitlines()[0]}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return None, tokenizer


def attach_adapter(model: PreTrainedModel, args: PeftArguments) -> PreTrainedModel:
    """A new LoRA adapter on ``model`` (``get_peft_model``); the base weights are frozen.

    Raises:
        ConfigError: ``--lora_target_modules`` names no module of the model.
    """
    from peft import LoraConfig, get_peft_model

    settings = args.lora_settings()
    targets = settings["target_modules"]
    # peft reads "all-linear" only as a string, never inside a list
    config = LoraConfig(
        task_type="CAUSAL_LM",
        bias="none",
        **{**settings, "target_modules": targets[0] if targets == ["all-linear"] else targets},
    )
    try:
        with peft_wrapping():
            peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"--lora_target_modules {settings['target_modules']}: {str(e).splitlines()[0]}") from e
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info(
        "new LoRA adapter r=%d alpha=%s dropout=%s on %s: %d trainable parameters of %d (%.2f%%)",
        settings["r"],
        settings["lora_alpha"],
        settings["lora_dropout"],
        settings["target_modules"],
        trainable,
        total,
        100 * trainable / total,
    )
    return peft_model  # type: ignore[return-value]


def merge_into_checkpoint(flags: Flags, checkpoint: Checkpoint) -> Checkpoint:
    """Replace the adapter checkpoint at ``checkpoint`` by a full one at the same step: base + adapter merged.

    The full checkpoint keeps the trainer state (the step, the log history) and the RNG state;
    its optimizer is new (AdamW moments of every weight start at zero) and its scheduler is
    the product's schedule at the checkpoint's step for the flags' learning rate. The adapter
    checkpoint stays beside it as ``merged-lora-checkpoint-<step>``. Written to a stage and committed
    (:func:`daemon.store.durable.commit_checkpoint`) before the swap's two renames: a kill before the swap
    leaves the adapter checkpoint as it was, and one between the renames is finished by the next run
    (:func:`daemon.store.adapter_files.finish_interrupted_merge`) before anything reads a checkpoint.

    Returns:
        The full checkpoint.
    """
    import torch
    from peft import PeftModel

    from daemon.store.checkpoints import Checkpoint as Found
    from daemon.store.durable import commit_checkpoint, fsync_dir
    from daemon.training.model import load_pretrained

    output_dir = Path(str(flags.training.output_dir))
    source = checkpoint.path
    step = checkpoint.global_step
    base, _ = load_pretrained(adapter_base(output_dir), flags.model.trust_remote_code)
    with peft_wrapping():
        merged = PeftModel.from_pretrained(base, str(source)).merge_and_unload()
    merged.requires_grad_(True)  # peft froze the base; full fine-tuning trains (and its optimizer holds) every weight
    _, tokenizer = load_pretrained_tokenizer(source, flags)
    stage = output_dir / f"{MERGING_PREFIX}{source.name}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    merged.save_pretrained(stage, safe_serialization=True)
    tokenizer.save_pretrained(stage)
    for path in source.iterdir():
        if path.name == "trainer_state.json" or path.name.startswith("rng_state") or path.name == "training_args.bin":
            shutil.copy2(path, stage / path.name)
    optimizer, scheduler = _fresh_optimizer_state(merged, flags, step)
    torch.save(optimizer, stage / "optimizer.pt")
    torch.save(scheduler, stage / "scheduler.pt")
    commit_checkpoint(stage, step)  # whole on disk before the swap: a kill between its renames keeps the merge
    kept = output_dir / f"{MERGED_PREFIX}{source.name}"
    shutil.rmtree(kept, ignore_errors=True)
    source.rename(kept)
    stage.rename(source)
    fsync_dir(output_dir)
    logger.warning(
        "merged the LoRA adapter of step %d into the weights (%s kept): full fine-tuning continues from here",
        step,
        kept.name,
    )
    return Found(source, step)


def _fresh_optimizer_state(model: Any, flags: Flags, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state dicts of the optimizer and scheduler a Trainer would build for ``model``, its schedule at ``step``."""
    from transformers import Trainer

    trainer = Trainer(model=model, args=flags.training)
    trainer.create_optimizer_and_scheduler(num_training_steps=max(step, 1))
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    assert optimizer is not None and scheduler is not None
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": no step is taken here
        warnings.simplefilter("ignore")
        for _ in range(step):
            scheduler.step()
    return optimizer.state_dict(), scheduler.state_dict()
