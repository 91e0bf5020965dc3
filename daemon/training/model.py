"""The model and tokenizer a run starts from (README "Train one file").

Order of precedence: the latest complete checkpoint in ``output_dir`` (the
running model), else ``--model_name_or_path`` (a local directory), else a model
already exported at the root of ``output_dir``, else the embedded default: a
small Llama-architecture causal LM and a byte-level BPE tokenizer trained on the
first file. Nothing is ever downloaded (``local_files_only=True``). A ``--model_name_or_path`` given
beside a checkpoint is the daemon's flag passed to every file: the line's own base
(``origin.json``) goes unremarked, another is ignored with a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.exceptions import CheckpointError, ConfigError
from daemon.store.jsonl import DEFAULT_CHAT_TEMPLATE, iter_text
from daemon.store.origin import read_origin
from daemon.store.sharded_files import is_sharded_checkpoint

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from daemon.config import ModelArguments
    from daemon.store.checkpoints import Checkpoint

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]

# About 4.3M parameters with the default 4096-token vocabulary (tied embeddings):
# 4 layers x (4*256^2 attention + 3*256*688 MLP) + 4096*256 embeddings.
DEFAULT_LLAMA_CONFIG = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
}


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer (GPT-2 style) with the ``tokenizers`` library.

    Args:
        texts: training text, streamed.
        vocab_size: target vocabulary size, special tokens included.

    Returns:
        A ``PreTrainedTokenizerFast`` with EOS (also BOS), PAD, the ChatML markers
        and :data:`daemon.store.jsonl.DEFAULT_CHAT_TEMPLATE`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN, *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=CHAT_TOKENS,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def parse_config_overrides(overrides: str | None) -> dict[str, int | float | bool | str]:
    """Parse ``"key=value,key=value"`` (run_clm.py's ``--config_overrides``) into typed values.

    Raises:
        ConfigError: an item is not ``key=value``.
    """
    result: dict[str, int | float | bool | str] = {}
    for item in filter(None, (overrides or "").split(",")):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--config_overrides: '{item}' is not key=value")
        value: int | float | bool | str = raw.strip()
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                pass
        if raw.strip().lower() in ("true", "false"):
            value = raw.strip().lower() == "true"
        result[key.strip()] = value
    return result


def bootstrap_model(tokenizer: PreTrainedTokenizerBase, model_args: ModelArguments, seed: int) -> PreTrainedModel:
    """A freshly initialised small Llama causal LM sized to ``tokenizer``.

    Args:
        tokenizer: its vocabulary size and special tokens define the embedding table.
        model_args: ``config_overrides`` adjusts :data:`DEFAULT_LLAMA_CONFIG`.
        seed: initialisation seed.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, Any] = {**DEFAULT_LLAMA_CONFIG, **parse_config_overrides(model_args.config_overrides)}
    try:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **settings,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--config_overrides: {e}") from e
    logger.info("bootstrapped a Llama model with %.2fM parameters", model.num_parameters() / 1e6)
    return model


def load_pretrained(
    path: str | Path, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a local causal LM and its tokenizer (safetensors preferred, never downloads).

    A tokenizer without a pad token gets its EOS as pad (padding is masked by the
    attention mask and -100 labels, so EOS stays learned); one without a chat template gets
    :data:`daemon.store.jsonl.DEFAULT_CHAT_TEMPLATE`, with which chat files are then rendered and
    which the export keeps. Both are said in the log.

    Hub kernels stay off unless ``USE_HUB_KERNELS`` is set: transformers 5 turns them on wherever
    the ``kernels`` package is installed, and a CUDA model's first ``train()`` then fetches their
    code from the Hub, which an unattended daemon offline cannot ("could not verify publisher
    trust status" on the first step).

    Raises:
        CheckpointError: the directory does not hold a loadable causal LM and tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            dtype="float32",
            use_kernels=None if "USE_HUB_KERNELS" in os.environ else False,
        )
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load a causal LM from {path}: {str(e).splitlines()[0]}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("%s: the tokenizer has no pad token; padding with its EOS token %r", path, tokenizer.eos_token)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        logger.info("%s: the tokenizer has no chat template; chat files are rendered in ChatML (docs/data.md)", path)
    return model, tokenizer


def own_trainable_memory(model: PreTrainedModel) -> int:
    """Copy each trainable CPU parameter out of the file it was loaded from into the process's own memory.

    transformers loads a safetensors file memory-mapped, private and copy-on-write: a parameter's
    storage is the file's pages until something writes to it. The optimizer's first step writes
    every parameter, each 4 KiB page through a copy-on-write fault: SmolLM2-135M's first fused
    AdamW step took 2.7 to 3.8 s, its later ones 0.08 s, and 0.08 s the first too once the
    parameters were copied (0.3 s for its 538 MB; BENCHMARKS.md, "real-model speed emulated-avx2").
    A frozen parameter (a LoRA line's base) is never written and stays where it is; so does a
    parameter on an accelerator. Tied parameters stay tied (one ``Parameter``, its ``data`` replaced).

    Returns:
        The bytes copied.
    """
    import torch

    copied = 0
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad and parameter.device.type == "cpu":
                parameter.data = parameter.data.clone()
                copied += parameter.numel() * parameter.element_size()
    return copied


def has_model(path: str | Path) -> bool:
    """True when ``path`` holds an exported model (a ``config.json``)."""
    return (Path(path) / "config.json").is_file()


def pretrained_start(model_args: ModelArguments, output_dir: str | Path) -> str | None:
    """The folder a run without a checkpoint loads: ``--model_name_or_path``, else the model exported in
    ``output_dir``; None when the run bootstraps the embedded model (:func:`starting_model`'s precedence)."""
    if model_args.model_name_or_path:
        return model_args.model_name_or_path
    return str(output_dir) if has_model(output_dir) else None


def starting_model(
    model_args: ModelArguments,
    output_dir: str | Path,
    seed: int,
    checkpoint: Checkpoint | None,
    records: datasets.Dataset,
    shape: str,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer a file's run starts from, by the precedence in this module's docstring.

    Args:
        model_args: ``--model_name_or_path``, ``--trust_remote_code`` and the bootstrap settings.
        output_dir: the running model's folder.
        seed: initialisation seed of a bootstrapped model.
        checkpoint: the latest complete checkpoint in ``output_dir``, if any.
        records: the file's parsed rows; their text trains a bootstrapped tokenizer.
        shape: the file's data shape (see :mod:`daemon.store.jsonl`).

    Raises:
        CheckpointError: a directory does not hold a loadable causal LM.
        ConfigError: ``--config_overrides`` does not make a valid model.
    """
    if checkpoint is not None:
        given, origin = model_args.model_name_or_path, read_origin(output_dir)
        base = origin["base_model"] if origin else None
        if given and not (base and Path(given).resolve() == Path(base).resolve()):  # not the line's own base
            logger.warning(
                "%s holds the running model (step %d, a line started from %s); --model_name_or_path %s is ignored",
                output_dir,
                checkpoint.global_step,
                base or "the embedded model",
                given,
            )
        logger.info("continuing from %s (global_step %d)", checkpoint.path, checkpoint.global_step)
        if is_sharded_checkpoint(checkpoint.path):  # FSDP's shards: the Trainer loads them when it resumes
            from daemon.training.sharding import model_from_checkpoint

            return model_from_checkpoint(checkpoint.path, model_args.trust_remote_code)
        return load_pretrained(checkpoint.path, model_args.trust_remote_code)
    pretrained = pretrained_start(model_args, output_dir)
    if pretrained is not None:
        if model_args.model_name_or_path:
            logger.info("starting from %s", pretrained)
        else:
            logger.info("starting from the model exported in %s (no checkpoint: fresh optimizer)", pretrained)
        return load_pretrained(pretrained, model_args.trust_remote_code)
    logger.info("bootstrapping the embedded model; training its tokenizer on this file")
    tokenizer = train_tokenizer(
        iter_text(records, shape, model_args.tokenizer_train_bytes), model_args.tokenizer_vocab_size
    )
    return bootstrap_model(tokenizer, model_args, seed), tokenizer
