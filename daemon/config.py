"""The product's own command-line options, as small dataclasses.

They are parsed together with :class:`transformers.TrainingArguments` by
``HfArgumentParser`` (see :mod:`daemon.training.arguments`), the way transformers'
``run_clm.py`` does. This module imports only the standard library, so the
daemon process can parse its options without importing torch.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from daemon.exceptions import ConfigError
from daemon.pretrained import pretrained_problems

DEFAULT_SAMPLE_PROMPTS = ["def ", "import ", "class ", "The ", "# "]
# A chat model (a pretrained base with a chat template of its own) is asked these as user turns instead.
CHAT_SAMPLE_PROMPTS = [
    "What is a Python decorator?",
    "Explain recursion in one sentence.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me one tip for writing clear code.",
]
# The daemon's pid, set for its training children so that they die with it (see cli.exit_with_supervisor).
SUPERVISOR_ENV = "CONTINUAL_DAEMON_PID"
# The daemon's host name beside its pid: a rank that a multi-node launcher started on another machine
# cannot see the daemon's process, and watches only its own parent there.
SUPERVISOR_HOST_ENV = "CONTINUAL_DAEMON_HOST"
# The daemon's ledger instance id, set for its training children so that they refuse any other ledger
# (a ledger.sqlite deleted or replaced meanwhile would give their --ledger_id to another file's row).
LEDGER_ENV = "CONTINUAL_LEDGER_INSTANCE"
# Set by `accelerate launch` for a config with distributed_type: FSDP (daemon.training.sharding).
FSDP_ENV = "ACCELERATE_USE_FSDP"


def sharding_requested(fsdp: object) -> bool:
    """Whether a run is asked to shard: an accelerate FSDP launch (:data:`FSDP_ENV`), or ``fsdp``, the value of the
    Trainer's ``--fsdp``, set. Here rather than in :mod:`daemon.training.sharding` so that the flags' defaults
    (:mod:`daemon.training.averaging_flags`) can ask before the Trainer's arguments exist."""
    return os.environ.get(FSDP_ENV, "false").lower() in ("true", "1") or bool(fsdp)


@dataclass
class ModelArguments:
    """Which model to start from when ``output_dir`` holds no checkpoint yet."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local HuggingFace causal-LM directory to start from. Default: the embedded small Llama model "
            "with a byte-level BPE tokenizer trained on the first file. Ignored once output_dir holds a checkpoint."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code shipped in the model directory."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated key=value overrides of the embedded model's LlamaConfig, as in run_clm.py "
            "(e.g. 'hidden_size=64,num_hidden_layers=2'). Only used when bootstrapping."
        },
    )
    tokenizer_vocab_size: int = field(
        default=4096, metadata={"help": "Vocabulary size of the byte-level BPE tokenizer trained when bootstrapping."}
    )
    tokenizer_train_bytes: int = field(
        default=16_000_000,
        metadata={"help": "At most this many bytes of the first file's text train the bootstrap tokenizer."},
    )

    def __post_init__(self) -> None:
        problems = []
        if self.tokenizer_vocab_size < 300:
            problems.append("--tokenizer_vocab_size must be at least 300 (256 byte symbols plus merges)")
        if self.model_name_or_path:
            problems += pretrained_problems(self.model_name_or_path, self.trust_remote_code)
        _raise_all(problems)


@dataclass
class DataArguments:
    """How one JSONL file becomes training examples (docs/data.md)."""

    dataset: str | None = field(default=None, metadata={"help": "The JSONL file to train on."})
    text_field: str = field(default="text", metadata={"help": "Field holding the document in language-modeling rows."})
    max_seq_length: int = field(default=256, metadata={"help": "Tokens per training sequence (packing block size)."})
    strict: bool = field(default=False, metadata={"help": "Fail the whole file on the first malformed line."})
    group_by_length: bool = field(  # type: ignore[assignment]
        default=True,
        metadata={
            "help": "Order each epoch so that an optimizer step's examples have similar lengths (transformers' "
            "get_length_grouped_indices, seeded by --seed + epoch): a micro-batch is padded to its longest, so a "
            "short example (a chat turn, a replayed or rehearsed one) beside 256-token blocks costs a whole block. "
            "false: a plain seeded shuffle."
        },
    )
    eval_fraction: float = field(
        default=0.05,
        metadata={"help": "Fraction of a file's examples held out: its slice of the evaluation suite."},
    )
    max_eval_examples: int = field(
        default=64,
        metadata={"help": "Upper bound on held-out examples per file, and on examples per --eval_files file."},
    )
    min_train_examples_for_eval: int = field(
        default=16, metadata={"help": "Files with fewer examples than this keep all of them for training."}
    )
    preprocessing_batch_size: int = field(
        default=1000, metadata={"help": "Rows per batch in the tokenization map (datasets.Dataset.map)."}
    )
    dataset_cache_dir: str | None = field(
        default=None, metadata={"help": "Arrow cache for parsed and tokenized files. Default: the datasets cache."}
    )

    def __post_init__(self) -> None:
        problems = []
        if self.max_seq_length < 8:
            problems.append("--max_seq_length must be at least 8")
        if not 0.0 <= self.eval_fraction < 0.5:
            problems.append("--eval_fraction must be in [0, 0.5)")
        if self.max_eval_examples < 0:
            problems.append("--max_eval_examples must be >= 0")
        if self.preprocessing_batch_size < 1:
            problems.append("--preprocessing_batch_size must be >= 1")
        _raise_all(problems)


@dataclass
class StatusArguments:
    """Where the training run reports and records (status folder, heartbeat, ledger row)."""

    status_dir: str = field(default="status", metadata={"help": "Folder for training_status.json, history, snapshots."})
    status_interval: float = field(
        default=2.0, metadata={"help": "Seconds between heartbeat writes of training_status.json."}
    )
    ledger_id: int | None = field(
        default=None, metadata={"help": "Ledger row of this file (set by the daemon for its training child)."}
    )

    def __post_init__(self) -> None:
        _raise_all(["--status_interval must be > 0 seconds"] if self.status_interval <= 0 else [])


@dataclass
class AccumulationArguments:
    """The multi-thread CPU gradient accumulation and its gradient guard (docs/speed.md "Multi-thread ...")."""

    grad_workers: str = field(
        default="auto",
        metadata={
            "help": "Worker threads computing each micro-batch's shards on CPU: N, or 'auto'. "
            "0, a GPU run or a distributed run use the stock Trainer step."
        },
    )
    max_consecutive_skipped_steps: int = field(
        default=10,
        metadata={"help": "Fail the file after this many optimizer steps in a row without a finite gradient."},
    )

    def __post_init__(self) -> None:
        problems = []
        if self.grad_workers != "auto" and not (self.grad_workers.isdigit()):
            problems.append("--grad_workers must be a whole number or 'auto'")
        if self.max_consecutive_skipped_steps < 1:
            problems.append("--max_consecutive_skipped_steps must be >= 1")
        _raise_all(problems)


@dataclass
class SampleArguments:
    """What each evolution snapshot samples from the model."""

    sample_prompts: list[str] = field(
        default=None,  # type: ignore[arg-type]  # resolved by daemon.training.arguments.resolve_defaults
        metadata={
            "help": "Prompts sampled into each evolution snapshot. Default: code and text openings for the embedded "
            "model; five questions, asked as user turns, for a pretrained base with a chat template of its own."
        },
    )
    sample_max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per snapshot sample."})
    sample_temperature: float = field(default=0.8, metadata={"help": "Sampling temperature of snapshot samples."})
    sample_top_k: int = field(default=50, metadata={"help": "Top-k of snapshot samples."})

    def __post_init__(self) -> None:
        problems = []
        if self.sample_max_new_tokens < 1:
            problems.append("--sample_max_new_tokens must be >= 1")
        if self.sample_temperature <= 0:
            problems.append("--sample_temperature must be > 0")
        _raise_all(problems)


ON_REGRESSION_CHOICES = ("warn", "rollback")


@dataclass
class EvaluationArguments:
    """The evaluation suite after each file and its quality gate (docs/evaluation.md)."""

    eval_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Fixed evaluation files (JSONL, any of the three shapes) evaluated after every file as slices "
            "of their own, on a fixed seeded subset of at most --max_eval_examples examples each."
        },
    )
    eval_budget: float = field(
        default=0.1,
        metadata={
            "help": "Evaluation time after a file, as a fraction of its training time: each slice is evaluated on "
            "the same seeded subset, cut to fit (never below one example per slice)."
        },
    )
    forward_transfer: bool = field(
        default=True,
        metadata={
            "help": "Score each file's own held-out slice with the model it starts from, before its first step "
            "(its loss before -> after, and forward transfer: docs/evaluation.md); counts in --eval_budget."
        },
    )
    max_regression: float | None = field(
        default=None,
        metadata={
            "help": "Quality gate, in nats: a file that raises the mean loss over the earlier slices and eval files "
            "by more than this, against the model before it, is handled as --on_regression says. Default: off."
        },
    )
    on_regression: str = field(
        default="warn",
        metadata={
            "help": "What a regression above --max_regression does: 'warn' records it and keeps the file; "
            "'rollback' undoes the file (model, optimizer, scheduler, export) and moves it to inbox/failed/.",
            "choices": list(ON_REGRESSION_CHOICES),
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if not self.eval_budget >= 0:
            problems.append("--eval_budget must be >= 0 (a fraction of the file's training time)")
        if self.max_regression is not None and not self.max_regression >= 0:
            problems.append("--max_regression must be >= 0 nats")
        if self.on_regression not in ON_REGRESSION_CHOICES:
            problems.append(f"--on_regression must be one of {', '.join(ON_REGRESSION_CHOICES)}")
        elif self.on_regression == "rollback" and self.max_regression is None:
            problems.append("--on_regression rollback needs --max_regression NATS")
        _raise_all(problems)

    def check_eval_files(self) -> None:
        """Refuse ``--eval_files`` that are not files: before a daemon starts or ``train.py`` trains.

        Not checked in a daemon's training child: a file that disappears later is reported
        by each evaluation (and makes the quality gate warn, with --max_regression), not a reason to fail drops.
        """
        missing = [path for path in self.eval_files if not Path(path).is_file()]
        _raise_all([f"--eval_files: no such file: {', '.join(missing)}"] if missing else [])


COOLDOWN_SHAPES = ("linear", "1-sqrt")


@dataclass
class ReplayArguments:
    """Replay of earlier files and cooldown exports (docs/data.md "Replay and cooldown exports")."""

    replay_fraction: float = field(  # type: ignore[assignment]
        default=None,
        metadata={
            "help": "Fraction of the examples trained for a file that are replayed from earlier files' training "
            "examples (the replay store); 0 turns replay off. Each file adds fraction / (1 - fraction) x its "
            "examples of replay. Default: 0.11 for the embedded model (with --replay_loss_weight 2: the least "
            'forgetting within 1.1x the no-replay steps, BENCHMARKS.md "continual"), 0.09 for a pretrained base.'
        },
    )
    replay_buffer_tokens: int = field(
        default=1_000_000,
        metadata={
            "help": "Tokens the replay store keeps over all earlier files (a fair share each: buffer / files); "
            "about 5 bytes a token on disk, in <status_dir>/replay/."
        },
    )
    base_rehearsal: bool = field(  # type: ignore[assignment]
        default=None,
        metadata={
            "help": "At a line's start from a pretrained base, keep the base model's own answers to neutral prompts "
            "(not the evaluation's) and rehearse them in every file at --base_rehearsal_fraction (docs/data.md). "
            "Default: on for a pretrained base (measured on SmolLM2's mixed stream: BENCHMARKS.md, "
            '"real-model stream"), off for the embedded model, which has no base to keep.'
        },
    )
    base_rehearsal_fraction: float = field(  # type: ignore[assignment]
        default=None,
        metadata={
            "help": "With --base_rehearsal, the fraction of the examples trained for a file that are the base model's "
            "own answers (fraction / (1 - fraction) x the file's examples, beside its replay); 0 rehearses nothing. "
            "Default: 0.2, 0.3 with --use_peft (a LoRA adapter moved the base-model slice more than full "
            'fine-tuning at 0.2: BENCHMARKS.md, "lora sweep r16").'
        },
    )
    cooldown_fraction: float = field(
        default=0.0,
        metadata={
            "help": "After each file, train a branch from its end checkpoint for this fraction of the file's steps "
            "with the learning rate decaying to zero, and export that model; the main line continues from the "
            "checkpoint before the branch. 0 (default) exports the main line's model."
        },
    )
    cooldown_shape: str = field(
        default="1-sqrt",
        metadata={
            "help": "Shape of the cooldown's decay: 'linear' or '1-sqrt' (Hagele et al. 2024).",
            "choices": list(COOLDOWN_SHAPES),
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if self.replay_fraction is not None and not 0.0 <= self.replay_fraction < 1.0:
            problems.append("--replay_fraction must be in [0, 1)")
        if self.base_rehearsal_fraction is not None and not 0.0 <= self.base_rehearsal_fraction < 1.0:
            problems.append("--base_rehearsal_fraction must be in [0, 1)")
        if self.replay_buffer_tokens < 0:
            problems.append("--replay_buffer_tokens must be >= 0")
        if not 0.0 <= self.cooldown_fraction <= 1.0:
            problems.append("--cooldown_fraction must be in [0, 1] (a fraction of the file's steps)")
        if self.cooldown_shape not in COOLDOWN_SHAPES:
            problems.append(f"--cooldown_shape must be one of {', '.join(COOLDOWN_SHAPES)}")
        _raise_all(problems)


@dataclass
class DaemonArguments:
    """Options of ``python -m daemon`` itself; every other flag is passed on to the training child."""

    inbox_dir: str = field(default="inbox", metadata={"help": "Drop zone watched for JSONL files."})
    status_dir: str = field(default="status", metadata={"help": "Folder for training_status.json, history, snapshots."})
    output_dir: str = field(default="current_model", metadata={"help": "Checkpoints and the exported model."})
    once: bool = field(default=False, metadata={"help": "Drain the inbox, then exit."})
    settle_seconds: float = field(
        default=2.0, metadata={"help": "A file counts as completely written once unchanged this long."}
    )
    rescan_seconds: float = field(
        default=5.0, metadata={"help": "Periodic rescan of the inbox, so a missed event never loses a file."}
    )
    max_files: int | None = field(default=None, metadata={"help": "Stop after this many files (tests, burst mode)."})
    launcher: str | None = field(
        default=None,
        metadata={
            "help": "Command prefix for the training child, e.g. 'torchrun --nproc_per_node 2' or "
            "'accelerate launch'; '-m daemon train ...' is appended. Default: this Python."
        },
    )
    stall_timeout: float = field(
        default=600.0,
        metadata={
            "help": "Seconds without training progress (a step, or a phase change) before the child is killed "
            "and the attempt counted. Must cover the longest checkpoint save, evaluation or tokenization."
        },
    )
    max_attempts: int = field(
        default=3, metadata={"help": "Crashed or stalled attempts of one file before it is failed."}
    )
    stop_grace_seconds: float = field(
        default=120.0, metadata={"help": "After SIGTERM, how long the child may take to checkpoint before SIGKILL."}
    )
    allow_duplicates: bool = field(
        default=False, metadata={"help": "Train a file whose content (sha256) was already trained."}
    )
    prestart: bool = field(
        default=True,
        metadata={
            "help": "Start the next training process while the inbox is idle or a file trains, so its imports "
            "(torch, transformers: about 4 s on 2 cores) are done when a file arrives. It holds about 0.4 GB "
            "while it waits. "
            "Idle before a pretrained line's first file, it also keeps the base model's answers (docs/speed.md) "
            "and then holds about the model's fp32 size more."
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if self.settle_seconds < 0:
            problems.append("--settle_seconds must be >= 0")
        if self.rescan_seconds <= 0:
            problems.append("--rescan_seconds must be > 0")
        if self.stall_timeout <= 0:
            problems.append("--stall_timeout must be > 0 seconds")
        if self.max_attempts < 1:
            problems.append("--max_attempts must be >= 1")
        if self.stop_grace_seconds < 0:
            problems.append("--stop_grace_seconds must be >= 0")
        _raise_all(problems)


def _raise_all(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))


def configure_logging() -> None:
    """Log lines to stderr (unbuffered), once per process; entry points call it."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
