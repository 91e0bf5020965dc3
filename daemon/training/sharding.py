"""FSDP through accelerate (docs/distributed.md): what a sharded run refuses, what it adds, what it gathers.

``--launcher "accelerate launch --config_file examples/fsdp.yaml"`` starts every rank with
``ACCELERATE_USE_FSDP=true`` and the config's ``FSDP_*`` variables; the Trainer's ``Accelerator``
then shards the model with FSDP2 (``fully_shard`` on each decoder layer, then the whole model) and
saves checkpoints through accelerate's ``save_fsdp_model``/``save_fsdp_optimizer``. The product's
code path stays the one of :mod:`daemon.training.run`; this module holds what differs:

- :func:`refuse_unsupported`, before the file is read: what cannot run sharded, in one line each.
- :func:`refuse_unsharded`, once the Trainer exists: FSDP asked for, but accelerate set up no FSDP.
- :func:`refuse_checkpoint`: a checkpoint the launch cannot continue (shards without FSDP, a whole
  model's checkpoint under FSDP).
- :func:`write_description`: the ``config.json`` and tokenizer the Trainer leaves out of a sharded checkpoint.
- :func:`refuse_diverging_plans`: ranks that planned a file differently (any launcher).
- :func:`consolidated_model`: after training, the whole model on the main process (accelerate's
  ``get_state_dict``: a collective of every rank), which the evaluation, the samples and the export use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.config import sharding_requested
from daemon.exceptions import ConfigError
from daemon.store.sharded_files import is_sharded_checkpoint
from daemon.training.technique_flags import DISTILLATION_FLAGS

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, Trainer, TrainingArguments

    from daemon.store.checkpoints import Checkpoint
    from daemon.training.arguments import Flags
    from daemon.training.plan import StepPlan

logger = logging.getLogger(__name__)

WHOLE_FSDP_WEIGHTS = "pytorch_model_fsdp.bin"  # accelerate's FULL_STATE_DICT checkpoint of the model


def fsdp_requested(training_args: TrainingArguments) -> bool:
    """Whether this run was asked to shard: an accelerate FSDP launch, or ``--fsdp`` in the Trainer's flags."""
    return sharding_requested(training_args.fsdp)


def refuse_unsupported(flags: Flags) -> None:
    """Refuse, before the file is read, what this version cannot run under FSDP.

    Raises:
        ConfigError: ``--grad_workers N`` (its threads take gradients with ``torch.autograd.grad``,
            which bypasses FSDP's reduce-scatter in ``backward``), ``--use_peft``, ``--cooldown_fraction``,
            ``--average_exports``, ``--replay_distillation`` or ``--file_distillation`` (none is built for a sharded
            model yet).
    """
    if not fsdp_requested(flags.training):
        return
    workers = flags.accumulation.grad_workers
    if workers not in ("auto", "0"):
        raise ConfigError(
            f"--grad_workers {workers} cannot run under FSDP (the worker threads' gradients bypass its "
            "reduce-scatter): use --grad_workers auto or 0"
        )
    if flags.peft.use_peft:
        raise ConfigError("--use_peft is not supported under FSDP yet: train LoRA with torchrun (DDP) or one process")
    if flags.replay.cooldown_fraction > 0:
        raise ConfigError("--cooldown_fraction is not supported under FSDP yet: set it to 0 for an FSDP launch")
    if flags.averaging.average_exports != "none":
        raise ConfigError("--average_exports is not supported under FSDP yet: leave it at none for an FSDP launch")
    for name in DISTILLATION_FLAGS:
        if getattr(flags.techniques, name) > 0:
            raise ConfigError(f"--{name} is not supported under FSDP yet: set it to 0 for an FSDP launch")


def refuse_unsharded(trainer: Trainer) -> None:
    """Refuse a run asked to shard whose ``Accelerator`` did not set up FSDP.

    accelerate 1.16 takes an FSDP config only for a process group on accelerator devices
    (``AcceleratorState``: distributed types ``MULTI_GPU``, ``MULTI_XPU``, ``MULTI_NPU``, ...); a CPU
    group is ``MULTI_CPU`` and would train as DDP, and ``use_cpu: false`` without a GPU gives every
    process a run of its own (world size 1), each writing the same folders.

    Raises:
        ConfigError: FSDP asked for, not in effect.
    """
    if fsdp_requested(trainer.args) and not getattr(trainer, "is_fsdp_enabled", False):
        kind = trainer.accelerator.distributed_type
        raise ConfigError(
            f"the launcher asks for FSDP but accelerate set up {kind.value} on {trainer.args.device.type} "
            f"(world size {trainer.args.world_size}): accelerate shards only on GPUs and other accelerators; "
            "on CPU use --launcher 'torchrun --nproc_per_node N' (DDP)"
        )


def saved_under_fsdp(folder: str | Path) -> bool:
    """Whether a checkpoint was saved by an FSDP run (sharded, or accelerate's whole-model FSDP file)."""
    return is_sharded_checkpoint(folder) or (Path(folder) / WHOLE_FSDP_WEIGHTS).is_file()


def refuse_checkpoint(training_args: TrainingArguments, checkpoint: Checkpoint | None) -> None:
    """Refuse a latest checkpoint that this launch cannot resume, before any model is loaded.

    Raises:
        ConfigError: shards without FSDP (the Trainer would stop with "only supported when using
            PyTorch FSDP"), or a checkpoint saved without FSDP under FSDP (accelerate's loaders look
            for its FSDP files).
    """
    if checkpoint is None:
        return
    name, fsdp = checkpoint.path.name, fsdp_requested(training_args)
    if is_sharded_checkpoint(checkpoint.path) and not fsdp:
        raise ConfigError(
            f"{name} holds FSDP shards: continue it with the FSDP launcher (docs/distributed.md), "
            "or roll back to a whole-model checkpoint"
        )
    if fsdp and not saved_under_fsdp(checkpoint.path):
        raise ConfigError(
            f"{name} was saved without FSDP, which an FSDP launch cannot resume (accelerate loads its FSDP "
            "files): continue without the FSDP launcher, or start a new model folder (docs/distributed.md)"
        )


def write_description(folder: str | Path, model: Any, tokenizer: Any) -> None:
    """Save the model's ``config.json`` (and generation config) and the tokenizer into a sharded checkpoint.

    Main process, before the commit marker: with the shards they make the checkpoint a model the
    next run builds (:func:`daemon.training.model.starting_model`) and a rollback exports
    (:func:`daemon.store.sharded_files.merge_weights`).
    """
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def consolidated_model(trainer: Trainer, model: PreTrainedModel) -> PreTrainedModel:
    """After training under FSDP: the whole model on the main process, ``model`` (still sharded) elsewhere.

    Every rank must call it: accelerate's ``get_state_dict`` gathers the shards (FSDP2:
    ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``), whole on rank 0 only. The
    main process loads them into a new, unsharded model of the same config (fp32, in CPU memory:
    :func:`place_gathered` moves it once the Trainer, its shards and optimizer state are freed), on
    which the evaluation, the samples and the export run without any collective.

    Raises:
        RuntimeError: the gathered state does not fit the model's config (a bug, not a user error).
    """
    import torch
    from transformers import AutoModelForCausalLM

    state = trainer.accelerator.get_state_dict(trainer.model)
    if not trainer.accelerator.is_main_process:
        return model
    whole = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    whole.load_state_dict(state, strict=True)
    whole.eval()
    logger.info("gathered the FSDP shards: %.2fM parameters on the main process", whole.num_parameters() / 1e6)
    return whole


def place_gathered(model: torch.nn.Module, training_args: TrainingArguments) -> None:
    """Move the gathered model (main process) to the training device, once the sharded Trainer is gone."""
    import gc

    if training_args.process_index == 0:
        gc.collect()  # the shards and the optimizer state, before a whole copy joins them on the device
        model.to(training_args.device)


def model_from_checkpoint(path: Path, trust_remote_code: bool) -> tuple[PreTrainedModel, Any]:
    """The model of a sharded checkpoint, built from its ``config.json`` and tokenizer: weights at resume.

    Its weights are initialised, not loaded: the Trainer loads the shards into the sharded model when
    it resumes from the checkpoint (accelerate's ``load_fsdp_model``), before the first step.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    return model, tokenizer


def refuse_diverging_plans(
    plan: StepPlan, sha256: str, gather: Callable[[tuple[Any, ...]], list[tuple[Any, ...]]] | None = None
) -> None:
    """Refuse a file whose ranks planned it differently (DDP and FSDP alike), before its plan is committed.

    Every rank plans from its own reading of the file, the ledger and the checkpoints; ranks that
    disagree (another version of the product on one of them, a checkpoint one rank did not see)
    would train different steps and hang at the first collective that one of them skips.

    Args:
        plan: this rank's plan.
        sha256: the file's content hash as this rank read it.
        gather: every rank's tuple, in rank order (default: ``torch.distributed.all_gather_object``;
            nothing is gathered in a run of one process).

    Raises:
        ConfigError: the ranks' plans differ; every rank raises it.
    """
    mine = (sha256, plan.start_step, plan.planned_steps, plan.replayed_examples, plan.effective_batch)
    if gather is None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
            return
        gather = _all_gather
    plans = gather(mine)
    if any(other != plans[0] for other in plans):
        steps = ", ".join(f"rank {rank}: {p[1]} -> {p[1] + p[2]}" for rank, p in enumerate(plans))
        raise ConfigError(f"the ranks planned this file differently ({steps}): run the same version on every rank")


def _all_gather(mine: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    import torch.distributed as dist

    plans: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(plans, mine)
    return plans
