"""The training process's flags: ``TrainingArguments`` with the product's defaults, and their parsing.

``HfArgumentParser`` reads the product's own dataclasses (:mod:`daemon.config`) together
with :class:`ContinualTrainingArguments`, the way transformers' ``run_clm.py`` does; a
``--config FILE`` (JSON or YAML, :mod:`daemon.config_file`) holds the same keys. Flags the
product owns (:data:`OWNED_FLAGS`) are set by the product, and a user who passes one is told.

"Was this flag given?" is a ``None`` default, answered once after parsing (TRL's
``trainer/base_config.py`` pattern): :func:`resolve_defaults` fills each flag of
:data:`DEFAULT_RULES` that is still ``None`` from the machine or from the other flags,
before the dataclasses are built, so ``--x=1`` and ``--x 1`` mean the same and the
machine is probed when flags are parsed, not when this module is imported.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import SchedulerType

from daemon.config import (
    CHAT_SAMPLE_PROMPTS,
    DEFAULT_SAMPLE_PROMPTS,
    AccumulationArguments,
    DataArguments,
    EvaluationArguments,
    ModelArguments,
    ReplayArguments,
    SampleArguments,
    StatusArguments,
    sharding_requested,
)
from daemon.config_file import CONFIG_HELP, DAEMON_KEYS, read_flags
from daemon.exceptions import ConfigError
from daemon.store.origin import base_model_of, has_own_chat_template
from daemon.training.averaging_flags import AveragingArguments, averaging_problems, default_average_exports
from daemon.training.peft_flags import LORA_LEARNING_RATE, LORA_REHEARSAL_FRACTION, PeftArguments, resolve_peft
from daemon.training.starting_defaults import PRETRAINED_DEFAULTS, starting_defaults
from daemon.training.technique_flags import TechniqueArguments, technique_problems
from daemon.training.tracker_flags import TrackerArguments, missing_trackers

logger = logging.getLogger(__name__)

# Schedules whose value at a step does not depend on num_training_steps, so a
# growing max_steps (one more file) cannot make the learning rate jump.
STEP_ONLY_SCHEDULES = {"constant", "constant_with_warmup"}
# Flags the product sets itself (name: (value, why)); a user who passes one is told and overridden.
# max_steps is not known before the plan: run.train_segments() sets it for each segment.
OWNED_FLAGS: dict[str, tuple[Any, str]] = {
    "max_steps": (-1, "start_step + planned_steps of the latest checkpoint and this file"),
    "ignore_data_skip": (True, "True: each file is trained from its first example"),
    "train_sampling_strategy": (
        "sequential",
        "'sequential': each epoch of the file has a fixed order drawn from --seed",
    ),
}


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """The first CPU's ``model name`` and ``flags`` from the Linux kernel's ``/proc/cpuinfo``.

    ``("", set())`` where it cannot be read (another OS).
    """
    try:
        lines = Path(cpuinfo).read_text(errors="replace").splitlines()
    except OSError:
        return "", set()
    name = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "")
    flags = next((x.split(":", 1)[1].split() for x in lines if x.startswith("flags")), [])
    return name, set(flags)


def cpu_has_fast_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 matmuls natively: AVX512-BF16 or AMX (Linux x86 flags).

    ``torch.backends.cpu.get_cpu_capability()`` names only the widest vector ISA
    ("AVX512"), not these extensions, so the kernel's flag list is read. Where it
    cannot be read (another OS), the answer is ``False`` and training stays fp32.
    """
    flags = cpu_info(cpuinfo)[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_bf16(cpuinfo: str | Path = "/proc/cpuinfo", use_cpu: bool = False) -> bool:
    """The ``--bf16`` default: whether the device training runs on computes bf16 natively.

    - A CUDA GPU: ``torch.cuda.is_bf16_supported()`` (Ampere and newer; with bf16 an H100 runs
      its tensor cores at twice the TF32 rate, NVIDIA's H100 datasheet).
    - Another accelerator (MPS, XPU, ...): off; pass ``--bf16`` where it pays.
    - A CPU: :func:`cpu_has_fast_bf16`. Without AVX512-BF16 or AMX, bf16 autocast is far slower
      than fp32 (docs/speed.md, BENCHMARKS.md), so training stays fp32.

    Args:
        cpuinfo: the kernel's CPU description (see :func:`cpu_has_fast_bf16`).
        use_cpu: the run trains on the CPU even where an accelerator is available (``--use_cpu``).
    """
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is None or use_cpu:
        return cpu_has_fast_bf16(cpuinfo)
    return accelerator.type == "cuda" and torch.cuda.is_bf16_supported()


def training_device(use_cpu: bool) -> torch.device:
    """The device a run trains on, known before its ``TrainingArguments`` are built (they pick it the same way).

    accelerate's ``PartialState`` trains on the CPU with ``use_cpu`` or without an accelerator,
    on ``cuda:LOCAL_RANK`` under a launcher (``torchrun``, ``accelerate launch``; device 0 without
    one), else on the available accelerator (MPS, XPU, ...).
    """
    if use_cpu or not torch.accelerator.is_available():
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    assert accelerator is not None  # is_available() said so
    if accelerator.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return accelerator


def default_torch_compile(device: torch.device) -> bool:
    """The ``--torch_compile`` default: on for a CUDA GPU of compute capability 8.0 or newer with Triton.

    - A CUDA GPU (Ampere and newer, where transformers itself says dynamo's speedups come, and
      Triton installed, which inductor needs there): on. The compiled step is much shorter than
      eager's; a model shape's first file pays for compiling, every later one loads inductor's
      cache in seconds (BENCHMARKS.md, gpu).
    - A CPU: off. The compiled stock step trained no faster than the eager defaults, within the
      machine's noise, and a shape's first file pays for compiling (BENCHMARKS.md, compile).
    - Another accelerator: off, as in transformers.
    """
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    from torch.utils._triton import has_triton

    return has_triton()


@dataclass
class ContinualTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the product's defaults (as TRL's ``SFTConfig`` does).

    Only defaults change; every flag keeps its transformers name and meaning.
    """

    output_dir: str | None = field(
        default="current_model", metadata={"help": "Checkpoints and the exported model (the running model)."}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over *this* file."})
    learning_rate: float = field(  # type: ignore[assignment]
        default=None,
        metadata={
            "help": "Peak learning rate. Default: 5e-4 for the embedded model trained from scratch, 5e-5 for a model "
            "whose line starts from a pretrained base (--model_name_or_path), 1e-3 for a LoRA adapter (--use_peft)."
        },
    )
    lr_scheduler_type: SchedulerType | str = field(
        default="constant_with_warmup",
        metadata={
            "help": "Learning-rate schedule. The default warms up once in the model's life, then stays constant."
        },
    )
    warmup_steps: float = field(  # type: ignore[assignment]
        default=None,
        metadata={
            "help": "Warmup length in optimizer steps, counted from the model's first step. Default: 100 for the "
            "embedded model, 0 for a pretrained base (its first file trains at the full rate)."
        },
    )
    logging_steps: float = field(default=10, metadata={"help": "Log loss and learning rate every X optimizer steps."})
    logging_first_step: bool = field(default=True, metadata={"help": "Log the first optimizer step of each file."})
    save_steps: float = field(
        default=200, metadata={"help": "Checkpoint every X optimizer steps (the end of a file always checkpoints)."}
    )
    save_total_limit: int | None = field(default=3, metadata={"help": "Checkpoints kept in output_dir."})
    # Not a TrainingArguments name: PlanCallback reads it.
    max_save_overhead: float = field(
        default=0.02,
        metadata={
            "help": "Most of the training time the --save_steps checkpoints may take: one is skipped while the last "
            "checkpoint took longer than this share of the time trained since it. 0: every --save_steps. The end "
            "of a file or epoch and a stop request always checkpoint; a run of several processes keeps every one."
        },
    )
    # Not a TrainingArguments name: the product's own rotation (CheckpointCallback) reads it.
    keep_file_checkpoints: int = field(
        default=3,
        metadata={
            "help": "The checkpoints at the end of the last N done files are kept out of --save_total_limit's "
            "rotation, so `python -m daemon rollback` can return to them. 0 keeps only the current file's start."
        },
    )
    # From here on, None means "not given" until resolve_defaults fills it (DEFAULT_RULES, OWNED_FLAGS), so
    # each keeps TrainingArguments' own type for its readers, and for HfArgumentParser: a bare --bf16 means True.
    # bf16 autocast through accelerate: the matmuls run in bf16, the master weights, optimizer
    # state and loss stay fp32. Faster than the fp32 training loop on a CPU with native bf16 (BENCHMARKS.md).
    bf16: bool = field(  # type: ignore[assignment]
        default=None,
        metadata={
            "help": "bf16 autocast with fp32 master weights. Default: on for a CUDA GPU with bf16 (Ampere "
            "and newer) and a CPU with AVX512-BF16 or AMX, off otherwise and with --fp16."
        },
    )
    torch_compile: bool = field(  # type: ignore[assignment]
        default=None,
        metadata={
            "help": "Compile the model with torch.compile (inductor's cache in ~/.cache/continual-daemon/inductor). "
            "Default: on for a CUDA GPU of compute capability 8.0 or newer with Triton, off otherwise."
        },
    )
    # accelerate runs DDP over gloo (MULTI_CPU) under torchrun only with use_cpu, and the device is
    # resolved inside __post_init__: so it is resolved before, to CPU on a machine without accelerator.
    use_cpu: bool = field(  # type: ignore[assignment]
        default=None, metadata={"help": "Train on CPU. Default: only when no accelerator is available."}
    )
    dataloader_pin_memory: bool = field(  # type: ignore[assignment]
        default=None,
        metadata={"help": "Pin the batches' memory for the copy to an accelerator. Default: on, except on a CPU."},
    )
    # The product owns these (OWNED_FLAGS): None says the user gave none.
    max_steps: int = field(  # type: ignore[assignment]
        default=None, metadata={"help": "Set by the product: " + OWNED_FLAGS["max_steps"][1]}
    )
    ignore_data_skip: bool = field(  # type: ignore[assignment]
        default=None, metadata={"help": "Set by the product: " + OWNED_FLAGS["ignore_data_skip"][1]}
    )
    train_sampling_strategy: str = field(  # type: ignore[assignment]
        default=None, metadata={"help": "Set by the product: " + OWNED_FLAGS["train_sampling_strategy"][1]}
    )

    def __post_init__(self) -> None:
        assert self.max_steps is not None, "built without resolve_defaults: use parse_args"
        # HfArgumentParser reads one --report_to value (the field is str | list[str]): several come comma-separated.
        if isinstance(self.report_to, str) and "," in self.report_to:
            self.report_to = [name.strip() for name in self.report_to.split(",") if name.strip()]
        super().__post_init__()


@dataclass
class Flags:
    """Every flag of one training run, grouped by what it configures (from :func:`parse_args`)."""

    model: ModelArguments
    data: DataArguments
    status: StatusArguments
    accumulation: AccumulationArguments
    samples: SampleArguments
    evaluation: EvaluationArguments
    training: ContinualTrainingArguments
    replay: ReplayArguments
    peft: PeftArguments
    trackers: TrackerArguments
    averaging: AveragingArguments
    techniques: TechniqueArguments

    def base_model(self) -> str | None:
        """The pretrained folder this run's line started from, or None for the embedded model
        (:func:`daemon.store.origin.base_model_of` of the output folder and ``--model_name_or_path``)."""
        return base_model_of(str(self.training.output_dir), self.model.model_name_or_path)


def _shown(value: Any) -> str:
    """A flag's value as it would be typed: ``5e-05``, ``0``, ``true``, ``none``."""
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else f"{value:g}"


def _sample_prompts(flags: dict[str, Any]) -> list[str]:
    """Questions for a pretrained base with its own chat template, code and text openings otherwise."""
    base = base_model_of(flags["output_dir"], flags["model_name_or_path"])
    return list(CHAT_SAMPLE_PROMPTS if base is not None and has_own_chat_template(base) else DEFAULT_SAMPLE_PROMPTS)


def _distillation(flags: dict[str, Any], name: str) -> float:
    """The starting model's default weight of a distillation term; 0 for a LoRA line and an FSDP launch, which
    cannot distil (technique_flags, sharding)."""
    return 0.0 if flags["use_peft"] or sharding_requested(flags["fsdp"]) else starting_defaults(flags)[name]


# Flags whose default depends on the machine or on other flags: each is None until given, and
# resolve_defaults sets a flag still None to its rule's value, in this order (a rule reads the flags
# resolved before it). A rule returning None leaves transformers' own default.
DEFAULT_RULES: dict[str, Callable[[dict[str, Any]], Any]] = {
    # A LoRA adapter learns at its own rate (daemon.training.peft_flags.LORA_LEARNING_RATE, measured on SmolLM2).
    "learning_rate": lambda flags: (
        LORA_LEARNING_RATE if flags["use_peft"] else starting_defaults(flags)["learning_rate"]
    ),
    "warmup_steps": lambda flags: starting_defaults(flags)["warmup_steps"],
    "replay_fraction": lambda flags: starting_defaults(flags)["replay_fraction"],
    "replay_loss_weight": lambda flags: starting_defaults(flags)["replay_loss_weight"],
    "replay_distillation": lambda flags: _distillation(flags, "replay_distillation"),
    "file_distillation": lambda flags: _distillation(flags, "file_distillation"),
    "base_rehearsal": lambda flags: starting_defaults(flags)["base_rehearsal"],
    "base_rehearsal_fraction": lambda flags: (
        LORA_REHEARSAL_FRACTION if flags["use_peft"] else starting_defaults(flags)["base_rehearsal_fraction"]
    ),
    "average_exports": lambda flags: default_average_exports(flags, starting_defaults(flags)["average_exports"]),
    "sample_prompts": _sample_prompts,
    "use_cpu": lambda flags: not torch.accelerator.is_available(),
    "bf16": lambda flags: False if flags["fp16"] else default_bf16(use_cpu=flags["use_cpu"]),
    "torch_compile": lambda flags: default_torch_compile(training_device(flags["use_cpu"])),
    "dataloader_pin_memory": lambda flags: training_device(flags["use_cpu"]).type != "cpu",
    # Progress goes to the log lines instead of \r-bars in a pipe; a terminal keeps transformers' default.
    "disable_tqdm": lambda flags: True if not sys.stderr.isatty() else None,
}
GROUPS = (
    ModelArguments,
    DataArguments,
    StatusArguments,
    AccumulationArguments,
    SampleArguments,
    EvaluationArguments,
    ContinualTrainingArguments,
    ReplayArguments,
    PeftArguments,
    TrackerArguments,
    AveragingArguments,
    TechniqueArguments,
)


def resolve_defaults(flags: dict[str, Any]) -> None:
    """Fill, in place, every flag not given (``None``) that the product decides: :data:`DEFAULT_RULES`, then
    the flags it owns (:data:`OWNED_FLAGS`; a value given for one is logged as ignored).

    Args:
        flags: every flag's parsed value by name, before the dataclasses are built.
    """
    resolve_peft(flags)  # --use_peft and the adapter's settings follow the running model; a switch is refused
    decided = [name for name in PRETRAINED_DEFAULTS if flags[name] is None]
    for name, rule in DEFAULT_RULES.items():
        if flags[name] is None:
            flags[name] = rule(flags)
    if decided and starting_defaults(flags) is PRETRAINED_DEFAULTS:
        logger.info(
            "a pretrained base: fine-tuning defaults %s (a flag given wins)",
            " ".join(f"--{name} {_shown(flags[name])}" for name in decided),
        )
    elif "average_exports" in decided and flags["average_exports"] == "ema":
        logger.info(
            "the embedded model exports the moving average of its weights (--average_exports ema --ema_decay %g; "
            "--average_exports none exports the latest weights)",
            flags["ema_decay"],
        )
    for name, (value, why) in OWNED_FLAGS.items():
        if flags[name] is not None:
            logger.warning("--%s is set by the product (%s); the value given is ignored", name, why)
        flags[name] = value


def parse_args(argv: list[str]) -> Flags:
    """Parse flags (and ``--config FILE``) with ``HfArgumentParser``, then apply the product's rules.

    The config file's keys that only the daemon reads (``--inbox_dir``, ``--once``, ...) are left
    to it, so one file serves the daemon and ``train.py``.

    Raises:
        ConfigError: a value is invalid (the message names the flag), a flag is unknown, or the
            config file cannot be read or has a key no command knows.
        SystemExit: argparse's own usage errors (exit code 2), as any HF script.
    """
    parser, values, unknown = _read(argv)
    if unknown:
        raise ConfigError(f"unrecognized flags: {' '.join(unknown)}")
    resolve_defaults(values)
    try:
        flags = Flags(*parser.parse_dict(values))
    except ValueError as e:  # TrainingArguments.__post_init__ validates combinations this way
        raise ConfigError(str(e).splitlines()[0]) from e
    _validate_training_args(flags.training)
    averaging = averaging_problems(
        flags.averaging, flags.training.keep_file_checkpoints, flags.replay.cooldown_fraction, flags.peft.use_peft
    )
    base = flags.base_model()
    replay, peft = flags.replay, flags.peft.use_peft
    averaging += technique_problems(
        flags.techniques,
        replay.replay_fraction,
        replay.cooldown_fraction,
        flags.averaging.average_exports,
        peft,
        base,
        str(flags.training.output_dir),
    )
    if averaging:
        raise ConfigError("; ".join(averaging))
    return flags


def run_folders(argv: list[str]) -> tuple[str, str]:
    """``(output_dir, status_dir)`` of a training command line as :func:`parse_args` reads them, before any rule.

    Raises:
        ConfigError: the config file cannot be read, or has a key no command knows.
        SystemExit: argparse's own usage errors (exit code 2).
    """
    _, values, _ = _read(argv)
    return str(values["output_dir"]), str(values["status_dir"])


def _read(argv: list[str]) -> tuple[HfArgumentParser, dict[str, Any], list[str]]:
    """The training flags' parser, the values ``argv`` (and its ``--config`` file) give, and the flags it does not
    know; the daemon's own keys of a config file are left to it."""
    parser = HfArgumentParser(GROUPS)  # type: ignore[arg-type]
    parser.add_argument("--config", help=CONFIG_HELP)
    values, unknown, _ = read_flags(parser, argv, left_to_others=DAEMON_KEYS)
    return parser, values, unknown


def _validate_training_args(args: ContinualTrainingArguments) -> None:
    problems = []
    if args.num_train_epochs <= 0:
        problems.append("--num_train_epochs must be > 0")
    if 0 < args.warmup_steps < 1:
        problems.append(
            "--warmup_steps must be a whole number of steps: a ratio of max_steps would move with every file"
        )
    if args.keep_file_checkpoints < 0:
        problems.append("--keep_file_checkpoints must be >= 0")
    if not 0 <= args.max_save_overhead < 1:
        problems.append("--max_save_overhead must be >= 0 and < 1 (a share of the training time)")
    if args.save_only_model:
        problems.append("--save_only_model cannot be used: checkpoints must hold the optimizer state to continue")
    problems += missing_trackers(args.report_to)
    if problems:
        raise ConfigError("; ".join(problems))
    if str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) not in STEP_ONLY_SCHEDULES:
        logger.warning(
            "--lr_scheduler_type %s is evaluated over each file's max_steps: the learning rate will jump at "
            "file boundaries. 'constant_with_warmup' (default) and 'constant' do not.",
            args.lr_scheduler_type,
        )
