"""The training process's flags: ``TrainingArguments`` with the product's defaults, and their parsing.

``HfArgumentParser`` reads the product's own dataclasses (:mod:`daemon.config`) together
with :class:`ContinualTrainingArguments`, the way transformers' ``run_clm.py`` does; a
``--config FILE`` (JSON or YAML) holds the same keys. Flags the product owns
(:data:`OWNED_FLAGS`) are set by the product, and a user who passes one is told.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import SchedulerType

from daemon.config import (
    AccumulationArguments,
    DataArguments,
    EvaluationArguments,
    ModelArguments,
    ReplayArguments,
    SampleArguments,
    StatusArguments,
    config_file_to_argv,
)
from daemon.exceptions import ConfigError

logger = logging.getLogger(__name__)

# Schedules whose value at a step does not depend on num_training_steps, so a
# growing max_steps (one more file) cannot make the learning rate jump.
STEP_ONLY_SCHEDULES = {"constant", "constant_with_warmup"}
# Flags the product sets itself; a user who passes one is told and overridden.
OWNED_FLAGS = {
    "max_steps": "start_step + planned_steps of the latest checkpoint and this file",
    "ignore_data_skip": "True: each file is trained from its first example",
    "train_sampling_strategy": "'sequential': each epoch of the file has a fixed order drawn from --seed",
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


def default_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """The ``--bf16`` default: whether the device training runs on computes bf16 natively.

    - A CUDA GPU: ``torch.cuda.is_bf16_supported()`` (Ampere and newer; with bf16 an H100 runs
      its tensor cores at twice the TF32 rate, NVIDIA's H100 datasheet).
    - Another accelerator (MPS, XPU, ...): off; pass ``--bf16`` where it pays.
    - A CPU: :func:`cpu_has_fast_bf16`. Without AVX512-BF16 or AMX, bf16 autocast is far slower
      than fp32 (README "Speed", BENCHMARKS.md), so training stays fp32.
    """
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is None:
        return cpu_has_fast_bf16(cpuinfo)
    return accelerator.type == "cuda" and torch.cuda.is_bf16_supported()


def default_torch_compile(device: torch.device) -> bool:
    """The ``--torch_compile`` default: on for a CUDA GPU of compute capability 8.0 or newer with Triton.

    - A CUDA GPU (Ampere and newer, where transformers itself says dynamo's speedups come, and
      Triton installed, which inductor needs there): on. On an H100 with a 110M-parameter Llama
      the compiled step took 50 ms against eager's 90 ms; a model shape's first file pays about
      40 s of compiling, every later one loads inductor's cache in seconds (BENCHMARKS.md, GPU).
    - A CPU: off. On the AVX2 EPYC the compiled stock step trained no faster than the eager
      defaults (0.89x and 1.01x in two goes) for 37 s of compiling a shape's first file
      (BENCHMARKS.md, compile).
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
    learning_rate: float = field(
        default=5e-4,
        metadata={"help": "Peak learning rate. Suits the embedded model trained from scratch; use ~5e-5 to fine-tune."},
    )
    lr_scheduler_type: SchedulerType | str = field(
        default="constant_with_warmup",
        metadata={
            "help": "Learning-rate schedule. The default warms up once in the model's life, then stays constant."
        },
    )
    warmup_steps: float = field(
        default=100, metadata={"help": "Warmup length in optimizer steps, counted from the model's first step."}
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
    # bf16 autocast through accelerate: the matmuls run in bf16, the master weights, optimizer
    # state and loss stay fp32. About 1.7x the fp32 training loop on an AVX512-BF16 CPU (BENCHMARKS.md).
    bf16: bool = field(
        default=default_bf16(),
        metadata={
            "help": "bf16 autocast with fp32 master weights. Default: on for a CUDA GPU with bf16 (Ampere "
            "and newer) and a CPU with AVX512-BF16 or AMX, off otherwise."
        },
    )
    # parse_args turns it on where default_torch_compile says so, once the device is known.
    torch_compile: bool = field(
        default=False,
        metadata={
            "help": "Compile the model with torch.compile (inductor's cache in ~/.cache/continual-daemon/inductor). "
            "Default: on for a CUDA GPU of compute capability 8.0 or newer with Triton, off otherwise."
        },
    )
    # accelerate runs DDP over gloo (MULTI_CPU) under torchrun only with use_cpu, and the device is
    # resolved inside __post_init__: so the default must already say CPU on a machine without accelerator.
    use_cpu: bool = field(
        default=not torch.accelerator.is_available(),  # HfArgumentParser ignores a bool default_factory
        metadata={"help": "Train on CPU (the default when no accelerator is available)."},
    )


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


def parse_args(argv: list[str]) -> Flags:
    """Parse flags (and ``--config FILE``) with ``HfArgumentParser``, then apply the product's rules.

    Raises:
        ConfigError: a value is invalid; the message names the flag.
        SystemExit: argparse's own usage errors (exit code 2), as any HF script.
    """
    argv = config_file_to_argv(argv)
    if "--fp16" in argv and "--bf16" not in argv:
        argv = [*argv, "--bf16", "False"]  # an explicit fp16 replaces the bf16 default, not conflicts with it
    groups = (
        ModelArguments,
        DataArguments,
        StatusArguments,
        AccumulationArguments,
        SampleArguments,
        EvaluationArguments,
        ContinualTrainingArguments,
        ReplayArguments,
    )
    parser = HfArgumentParser(groups)  # type: ignore[arg-type]
    flags = _parse(parser, argv)
    if "--torch_compile" not in argv and not flags.training.torch_compile:
        if default_torch_compile(flags.training.device):  # known once parsed; __post_init__ sets compiling up
            argv = [*argv, "--torch_compile", "True"]
            flags = _parse(parser, argv)
    training_args = flags.training
    _apply_owned_flags(argv, training_args)
    _validate_training_args(training_args)
    if "--disable_tqdm" not in argv and not sys.stderr.isatty():
        training_args.disable_tqdm = True  # progress goes to the log lines instead of \r-bars in a pipe
    if "--dataloader_pin_memory" not in argv and training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
    return flags


def _parse(parser: HfArgumentParser, argv: list[str]) -> Flags:
    try:
        return Flags(*parser.parse_args_into_dataclasses(args=argv))
    except ValueError as e:  # TrainingArguments.__post_init__ validates combinations this way
        raise ConfigError(str(e).splitlines()[0]) from e


def _apply_owned_flags(argv: list[str], args: TrainingArguments) -> None:
    for name, how in OWNED_FLAGS.items():
        if f"--{name}" in argv:
            logger.warning("--%s is set by the product (%s); the value given is ignored", name, how)
    args.ignore_data_skip = True
    args.train_sampling_strategy = "sequential"
    args.max_steps = -1  # not known before the plan: run.fit() sets it for each segment


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
    if problems:
        raise ConfigError("; ".join(problems))
    if str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) not in STEP_ONLY_SCHEDULES:
        logger.warning(
            "--lr_scheduler_type %s is evaluated over each file's max_steps: the learning rate will jump at "
            "file boundaries. 'constant_with_warmup' (default) and 'constant' do not.",
            args.lr_scheduler_type,
        )
