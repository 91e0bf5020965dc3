"""Sharded (FSDP) checkpoints on disk: how one is recognised, judged complete, and turned into an export.

Under ``accelerate launch`` with an FSDP config whose ``fsdp_state_dict_type`` is
``SHARDED_STATE_DICT`` (docs/distributed.md), the Trainer saves a checkpoint as each rank's shards
in ``torch.distributed.checkpoint`` (DCP) folders, through accelerate's ``save_fsdp_model`` and
``save_fsdp_optimizer``::

    checkpoint-<step>/
        pytorch_model_fsdp_0/   __<rank>_0.distcp ..., .metadata   (the model's shards)
        optimizer_0/            __<rank>_0.distcp ..., .metadata   (the optimizer's shards)
        scheduler.pt, trainer_state.json, rng_state_<rank>.pth
        config.json, generation_config.json, the tokenizer's files   (written by the product)

DCP writes ``.metadata`` last, once every rank's shards are written, so a folder with its
``.metadata`` holds whole shards. The Trainer writes no ``config.json`` nor tokenizer into such a
checkpoint; the run adds them before the commit marker
(:class:`daemon.training.callbacks.CheckpointCallback`), so the checkpoint alone describes the model.

Standard library only at import time: the daemon process and ``python -m daemon rollback`` use it
without torch; :func:`merge_weights` imports accelerate where a rollback needs the weights.
"""

from __future__ import annotations

from pathlib import Path

# accelerate's names (accelerate.utils.constants FSDP_MODEL_NAME, OPTIMIZER_NAME; index 0: one model)
MODEL_SHARDS = "pytorch_model_fsdp_0"
OPTIMIZER_SHARDS = "optimizer_0"
DCP_METADATA = ".metadata"
CONFIG_FILE = "config.json"


def is_sharded_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` holds the model as FSDP shards (a DCP folder), not as a whole model."""
    return (Path(folder) / MODEL_SHARDS).is_dir()


def sharded_problem(folder: Path) -> str | None:
    """None when a sharded checkpoint has its shards' metadata and its model description, else what is missing.

    The shards' sizes are the commit marker's to check (:func:`daemon.store.durable.commit_problem`).
    """
    for part, what in ((MODEL_SHARDS, "model"), (OPTIMIZER_SHARDS, "optimizer")):
        if not (folder / part / DCP_METADATA).is_file():
            return f"no {part}/{DCP_METADATA} (the {what}'s shards are not whole)"
    if not (folder / CONFIG_FILE).is_file():
        return f"no {CONFIG_FILE} beside the shards"
    return None


def shard_bytes(folder: Path) -> int:
    """Bytes of the model's shards in ``folder``: about what its consolidated weights take (0 when none)."""
    shards = folder / MODEL_SHARDS
    return sum(p.stat().st_size for p in shards.iterdir() if p.is_file()) if shards.is_dir() else 0


def merge_weights(checkpoint: Path, staged: Path) -> None:
    """Write the consolidated weights of a sharded checkpoint to ``staged/model.safetensors``.

    With accelerate's ``merge_fsdp_weights`` (one process, no process group: DCP's no-dist load),
    which keeps the model's own parameter names, so ``from_pretrained`` loads the folder once the
    checkpoint's ``config.json`` and tokenizer files are beside it.
    """
    from accelerate.utils import merge_fsdp_weights

    merge_fsdp_weights(str(checkpoint / MODEL_SHARDS), str(staged), safe_serialization=True)
