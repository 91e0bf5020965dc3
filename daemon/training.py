"""Continue training the running model on one JSONL file: the one training code path.

Used by ``python train.py --dataset FILE`` and by the daemon's child process.
A run reads as ``setup -> fit -> evaluate -> save`` (:func:`train_file`):

1. scan the file, find the latest complete checkpoint, load or bootstrap the model,
   tokenize, plan the steps (:class:`StepPlan`, SPEC section 6) and write the plan to
   the ledger; an interrupted file keeps its recorded plan;
2. ``Trainer.train(resume_from_checkpoint=...)`` once per remaining segment (one per
   epoch, :meth:`StepPlan.segments`) with ``max_steps`` at the segment's end and
   ``ignore_data_skip=True``; every end is checked and checkpointed, the last one being
   ``max_steps = start_step + steps_for_file``;
3. held-out evaluation and samples, once training (and its threads) has fully stopped;
4. export to the root of ``output_dir``, evolution snapshot, history row, ledger ``done``.

This module is the only place that builds a ``Trainer``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import SchedulerType

from daemon import data as data_mod
from daemon.accumulation import GuardCounters, ThreadedAccumulationTrainer, resolve_workers
from daemon.checkpoints import Checkpoint, latest_complete_checkpoint
from daemon.config import (
    SUPERVISOR_ENV,
    DataArguments,
    ModelArguments,
    RunArguments,
    config_file_to_argv,
    configure_logging,
)
from daemon.exceptions import ConfigError, DaemonError, TrainingError, TrainingInterrupted
from daemon.ledger import Entry, Ledger
from daemon.model import bootstrap_model, has_model, load_pretrained, train_tokenizer
from daemon.records import HistoryRow, utc_now
from daemon.snapshots import GenerationSettings, generate_samples, perplexity, write_snapshot
from daemon.status import Heartbeat, StatusFile

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 3
# Schedules whose value at a step does not depend on num_training_steps, so a
# growing max_steps (one more file) cannot make the learning rate jump.
STEP_ONLY_SCHEDULES = {"constant", "constant_with_warmup"}
# Flags the product sets itself; a user who passes one is told and overridden.
OWNED_FLAGS = {
    "max_steps": "start_step + steps_for_file of the latest checkpoint and this file",
    "ignore_data_skip": "True: each file is trained from its first example",
    "train_sampling_strategy": "'sequential': each epoch of the file has a fixed order drawn from --seed",
}


def cpu_has_fast_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 matmuls natively: AVX512-BF16 or AMX (Linux x86 flags).

    ``torch.backends.cpu.get_cpu_capability()`` names only the widest vector ISA
    ("AVX512"), not these extensions, so the kernel's flag list is read. Where it
    cannot be read (another OS), the answer is ``False`` and training stays fp32.
    """
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
    # bf16 autocast through accelerate: the matmuls run in bf16, the master weights, optimizer
    # state and loss stay fp32. About 1.7x the fp32 training loop on an AVX512-BF16 CPU (BENCHMARKS.md).
    bf16: bool = field(
        default=not torch.accelerator.is_available() and cpu_has_fast_bf16(),
        metadata={
            "help": "bf16 autocast with fp32 master weights. Default: on when training on a CPU with "
            "AVX512-BF16 or AMX, off otherwise (pass --bf16 on a GPU that supports it)."
        },
    )
    # accelerate runs DDP over gloo (MULTI_CPU) under torchrun only with use_cpu, and the device is
    # resolved inside __post_init__: so the default must already say CPU on a machine without accelerator.
    use_cpu: bool = field(
        default=not torch.accelerator.is_available(),  # HfArgumentParser ignores a bool default_factory
        metadata={"help": "Train on CPU (the default when no accelerator is available)."},
    )


@dataclass(frozen=True)
class StepPlan:
    """The step accounting of one file (SPEC section 6).

    ``effective_batch = per_device_train_batch_size * gradient_accumulation_steps * world_size``;
    ``steps_for_file = ceil(epochs * ceil(train_examples / effective_batch))`` (whole epochs give
    ``epochs * ceil(...)``; the rounding matches ``Trainer.set_initial_training_values``, which
    counts a last partial accumulation as a step); ``max_steps = start_step + steps_for_file``.
    """

    start_step: int
    train_examples: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    epochs: float

    @property
    def effective_batch(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_examples / self.effective_batch)

    @property
    def steps_for_file(self) -> int:
        return math.ceil(self.epochs * self.steps_per_epoch)

    @property
    def max_steps(self) -> int:
        return self.start_step + self.steps_for_file

    def segments(self, done: int) -> list[tuple[int, int, int]]:
        """What is left after ``done`` of this file's steps, one segment per epoch.

        Epoch ``e`` trains the file's examples in its own fixed order (see
        :func:`segment_dataset`), ``effective_batch`` examples per step, the last
        batch partial; a fractional last epoch stops early. Resuming at any step
        therefore trains exactly the remaining steps on the not-yet-seen examples.

        Returns:
            ``[(epoch, first_batch, steps), ...]`` in training order (empty when done).
        """
        out = []
        step = done
        while step < self.steps_for_file:
            epoch, first_batch = divmod(step, self.steps_per_epoch)
            steps = min(self.steps_per_epoch - first_batch, self.steps_for_file - step)
            out.append((epoch, first_batch, steps))
            step += steps
        return out


def plan_steps(start_step: int, train_examples: int, args: TrainingArguments) -> StepPlan:
    """Build the :class:`StepPlan` for a file of ``train_examples`` starting at ``start_step``.

    Raises:
        TrainingError: the plan would train zero steps (never reported as done).
    """
    plan = StepPlan(
        start_step=start_step,
        train_examples=train_examples,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        world_size=max(1, args.world_size),
        epochs=args.num_train_epochs,
    )
    if plan.steps_for_file <= 0:
        raise TrainingError(f"the plan has no step ({train_examples} examples, {plan.epochs} epochs)")
    return plan


# ---------------------------------------------------------------------------- arguments


def parse_args(
    argv: list[str],
) -> tuple[ModelArguments, DataArguments, RunArguments, ContinualTrainingArguments]:
    """Parse flags (and ``--config FILE``) with ``HfArgumentParser``, then apply the product's rules.

    Raises:
        ConfigError: a value is invalid; the message names the flag.
        SystemExit: argparse's own usage errors (exit code 2), as any HF script.
    """
    argv = config_file_to_argv(argv)
    if "--fp16" in argv and "--bf16" not in argv:
        argv = [*argv, "--bf16", "False"]  # an explicit fp16 replaces the bf16 default, not conflicts with it
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, RunArguments, ContinualTrainingArguments)  # type: ignore[arg-type]
    )
    try:
        model_args, data_args, run_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # TrainingArguments.__post_init__ validates combinations this way
        raise ConfigError(str(e).splitlines()[0]) from e
    _apply_owned_flags(argv, training_args)
    _validate_training_args(training_args)
    if "--disable_tqdm" not in argv and not sys.stderr.isatty():
        training_args.disable_tqdm = True  # progress goes to the log lines instead of \r-bars in a pipe
    if "--dataloader_pin_memory" not in argv and training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
    return model_args, data_args, run_args, training_args


def _apply_owned_flags(argv: list[str], args: TrainingArguments) -> None:
    for name, how in OWNED_FLAGS.items():
        if f"--{name}" in argv:
            logger.warning("--%s is set by the product (%s); the value given is ignored", name, how)
    args.ignore_data_skip = True
    args.train_sampling_strategy = "sequential"
    args.max_steps = -1  # set per file in fit()


def _validate_training_args(args: TrainingArguments) -> None:
    problems = []
    if args.num_train_epochs <= 0:
        problems.append("--num_train_epochs must be > 0")
    if 0 < args.warmup_steps < 1:
        problems.append(
            "--warmup_steps must be a whole number of steps: a ratio of max_steps would move with every file"
        )
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


# ---------------------------------------------------------------------------- callbacks


class PlanCallback(TrainerCallback):
    """Checkpoints at the end of every segment (and so of the file), or early on a stop request.

    Args:
        stop_requested: set by the SIGINT/SIGTERM handler; the run checkpoints at the
            next optimizer step and stops.
    """

    def __init__(self, stop_requested: threading.Event) -> None:
        self.stop_requested = stop_requested

    def _stop_everywhere(self, args: TrainingArguments) -> bool:
        """Whether any process got a stop signal; all processes must stop at the same step."""
        if args.world_size <= 1:
            return self.stop_requested.is_set()
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.stop_requested.is_set() else 0.0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one scalar per step: negligible next to the gradients
        if flag.item() > 0:
            self.stop_requested.set()
        return self.stop_requested.is_set()

    def on_step_end(self, args, state, control, **kwargs):
        # state.max_steps is the current segment's end (fit() sets args.max_steps per segment).
        if state.global_step >= state.max_steps or self._stop_everywhere(args):
            control.should_save = True
            control.should_training_stop = True
        return control


class ProgressCallback(TrainerCallback):
    """Feeds the heartbeat with progress and metrics, and logs one line per logging step.

    Only in-memory updates happen here; the heartbeat thread writes the file.
    """

    def __init__(
        self,
        heartbeat: Heartbeat | None,
        plan: StepPlan,
        current_file: dict[str, Any],
        tokens: int,
        guard: GuardCounters,
    ) -> None:
        self.heartbeat = heartbeat
        self.guard = guard
        self.last_grad_norm: float | None = None
        self.first_step: int | None = None
        self.plan = plan
        self.current_file = current_file
        self.tokens_per_step = tokens * plan.epochs / plan.steps_for_file
        self.started = time.monotonic()
        self.metrics: dict[str, Any] = {
            "loss": None,
            "learning_rate": None,
            "grad_norm": None,
            "tokens_per_second": None,
        }

    def _steps_done(self, state) -> int:
        return state.global_step - self.plan.start_step

    def on_train_begin(self, args, state, control, **kwargs):
        if self.first_step is None:  # the first segment of this process; a resumed file starts mid-plan
            self.first_step = state.global_step
            self.started = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        done = self._steps_done(state)
        if done == 1 and args.logging_first_step:
            control.should_log = True  # the first step of each file, not only of the model's life
        here = state.global_step - (self.first_step or 0)  # steps trained by this process
        elapsed = time.monotonic() - self.started
        rate = here / elapsed if elapsed > 0 and here > 0 else None
        self.metrics["tokens_per_second"] = round(rate * self.tokens_per_step, 1) if rate else None
        left = self.plan.steps_for_file - done
        self.current_file.update(
            steps_done=done,
            progress=round(done / self.plan.steps_for_file, 4),
            eta_seconds=round(left / rate, 1) if rate else None,
        )
        if self.heartbeat is not None:
            self.heartbeat.set(
                progress_at=time.time(),
                global_step=state.global_step,
                current_file=dict(self.current_file),
                gradient_guard={**self.guard.as_status(), "last_grad_norm": self.last_grad_norm},
            )

    def on_substep_end(self, args, state, control, **kwargs):
        if self.heartbeat is not None:  # a micro-batch done: progress for the daemon's stall detection
            self.heartbeat.set(progress_at=time.time())

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        for key in ("loss", "learning_rate", "grad_norm"):
            if key in logs:
                self.metrics[key] = logs[key]
        self.last_grad_norm = logs.get("grad_norm", self.last_grad_norm)
        if "loss" in logs:
            logger.info(
                "step %d/%d (%d/%d of this file) loss %.4f lr %.3g grad_norm %s tokens/s %s",
                state.global_step,
                self.plan.max_steps,
                self._steps_done(state),
                self.plan.steps_for_file,
                logs["loss"],
                logs.get("learning_rate", float("nan")),
                f"{logs['grad_norm']:.3g}" if "grad_norm" in logs else "-",
                self.metrics["tokens_per_second"],
            )
        if self.heartbeat is not None:
            self.heartbeat.set(metrics=dict(self.metrics))


# ---------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything :func:`setup` prepares for :func:`fit`."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    data: data_mod.PreparedData
    report: data_mod.ScanReport
    checkpoint: Checkpoint | None
    plan: StepPlan
    done_steps: int
    resumed: Entry | None
    current_file: dict[str, Any]


def setup(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    ledger: Ledger,
    heartbeat: Heartbeat | None,
    ledger_entry: int | None = None,
) -> Run:
    """Scan and tokenize the file, pick the starting model and plan the steps.

    Nothing on disk outside the datasets cache changes before the file is known
    to be usable, so a bad file leaves the model and checkpoints untouched. A
    file whose plan the ledger already holds (an interrupted run) keeps that
    plan and resumes at the latest checkpoint inside it.

    Raises:
        DatasetError, CheckpointError, ConfigError, TrainingError.
    """
    assert data_args.dataset is not None
    report = data_mod.scan_jsonl(data_args.dataset, data_args.text_field, data_args.strict)
    _beat(heartbeat, state="tokenizing")
    records = data_mod.load_records(report, data_args)
    # Only the main process renames torn checkpoints; the others just skip them.
    checkpoint = latest_complete_checkpoint(str(training_args.output_dir), set_aside=training_args.process_index == 0)
    model, tokenizer = _starting_model(model_args, training_args, checkpoint, records, report.shape)
    prepared = data_mod.prepare_datasets(records, report.shape, tokenizer, data_args, training_args.seed)
    at_step = checkpoint.global_step if checkpoint else 0
    resumed = _resumable_plan(ledger, report, at_step, training_args.process_index == 0, ledger_entry)
    start_step = at_step if resumed is None or resumed.start_step is None else resumed.start_step
    plan = plan_steps(start_step, prepared.train_examples, training_args)
    if resumed and plan.steps_for_file != resumed.planned_steps:
        raise ConfigError(
            f"{report.path.name} was planned with {resumed.planned_steps} steps and is half trained; "
            f"these flags give {plan.steps_for_file}: resume it with the batch and epoch flags it started with"
        )
    done_steps = at_step - plan.start_step
    if resumed:
        logger.info(
            "resuming %s at step %d of its plan %d -> %d", report.path.name, at_step, plan.start_step, plan.max_steps
        )
    current_file = {
        "name": report.path.name,
        "sha256": report.sha256,
        "examples": prepared.train_examples,
        "eval_examples": prepared.eval_examples,
        "tokens": prepared.train_tokens,
        "skipped_lines": report.bad_lines,
        "start_step": plan.start_step,
        "planned_steps": plan.steps_for_file,
        "steps_done": done_steps,
        "progress": round(done_steps / plan.steps_for_file, 4),
        "eta_seconds": None,
    }
    logger.info(
        "%s: %s, %d train examples (%d tokens), %d held out; effective batch %d = %d x %d x world %d; "
        "steps %d -> %d (%d for this file)",
        report.path.name,
        report.shape,
        prepared.train_examples,
        prepared.train_tokens,
        prepared.eval_examples,
        plan.effective_batch,
        plan.per_device_train_batch_size,
        plan.gradient_accumulation_steps,
        plan.world_size,
        plan.start_step,
        plan.max_steps,
        plan.steps_for_file,
    )
    return Run(model, tokenizer, prepared, report, checkpoint, plan, done_steps, resumed, current_file)


def _resumable_plan(
    ledger: Ledger, report: data_mod.ScanReport, at_step: int, is_main: bool, entry_id: int | None
) -> Entry | None:
    """The ledger's plan for this file if training it was interrupted inside that plan.

    The row is ``entry_id`` (the daemon's claim) or, for ``train.py`` on its own, the
    newest ``training`` row with this content.

    A recorded plan that the running model has left (the checkpoint is outside
    ``[start_step, start_step + planned_steps]``, e.g. checkpoints were deleted)
    cannot be resumed exactly: it is marked failed and the file is planned anew.
    """
    entry = ledger.get(entry_id) if entry_id is not None else ledger.find(report.sha256, ("training",))
    if entry is None or entry.state != "training" or entry.start_step is None or entry.planned_steps is None:
        return None
    if entry.start_step <= at_step <= entry.start_step + entry.planned_steps:
        return entry
    logger.warning(
        "%s: its recorded plan %d -> %d no longer matches the latest checkpoint (step %d); planning anew",
        report.path.name,
        entry.start_step,
        entry.start_step + entry.planned_steps,
        at_step,
    )
    if is_main:
        ledger.update(entry.id, state="failed", error=f"abandoned: the running model is at step {at_step}")
    return None


def record_plan(ledger: Ledger, run: Run, entry_id: int | None) -> Entry:
    """Write the file's plan to the ledger before its first optimizer step (main process only).

    Uses the interrupted run's row, or the daemon's claim ``entry_id``, or adds a
    row (``train.py`` used on its own).
    """
    if run.resumed is not None:
        return run.resumed
    fields = {"state": "training", "start_step": run.plan.start_step, "planned_steps": run.plan.steps_for_file}
    queued = ledger.get(entry_id) if entry_id is not None else None
    if queued is None:
        queued = ledger.add(run.report.path.name, "queued", run.report.sha256, run.report.size_bytes)
    return ledger.update(queued.id, **fields)


def segment_dataset(run: Run, epoch: int, first_batch: int, steps: int, seed: int) -> Any:
    """The examples of one segment: epoch ``epoch``'s order, batches ``first_batch`` to ``+steps``.

    Epoch 0 is the prepared order (shuffled once with ``seed``); epoch ``e`` reshuffles
    it with ``seed + e``. Both are deterministic, so a restart sees the same order.
    """
    data = run.data.train if epoch == 0 else run.data.train.shuffle(seed=seed + epoch)
    eb = run.plan.effective_batch
    start, stop = first_batch * eb, min(data.num_rows, (first_batch + steps) * eb)
    return data if (start, stop) == (0, data.num_rows) else data.select(range(start, stop))


def _starting_model(
    model_args: ModelArguments,
    training_args: TrainingArguments,
    checkpoint: Checkpoint | None,
    records: Any,
    shape: str,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    output_dir = str(training_args.output_dir)
    if checkpoint is not None:
        if model_args.model_name_or_path:
            logger.warning(
                "%s holds the running model (step %d); --model_name_or_path is ignored",
                output_dir,
                checkpoint.global_step,
            )
        logger.info("continuing from %s (global_step %d)", checkpoint.path, checkpoint.global_step)
        return load_pretrained(checkpoint.path, model_args.trust_remote_code)
    if model_args.model_name_or_path:
        logger.info("starting from %s", model_args.model_name_or_path)
        return load_pretrained(model_args.model_name_or_path, model_args.trust_remote_code)
    if has_model(output_dir):
        logger.info("starting from the model exported in %s (no checkpoint: fresh optimizer)", output_dir)
        return load_pretrained(output_dir, model_args.trust_remote_code)
    logger.info("bootstrapping the embedded model; training its tokenizer on this file")
    tokenizer = train_tokenizer(
        data_mod.iter_text(records, shape, model_args.tokenizer_train_bytes), model_args.tokenizer_vocab_size
    )
    return bootstrap_model(tokenizer, model_args, training_args.seed), tokenizer


def build_trainer(
    run: Run, run_args: RunArguments, training_args: TrainingArguments, callbacks: list[TrainerCallback]
) -> ThreadedAccumulationTrainer:
    """The ``Trainer`` for one file, with ``max_steps`` from the plan and ``--grad_workers`` threads."""
    training_args.max_steps = run.plan.max_steps
    precision = "bf16 autocast" if training_args.bf16 else "fp16 autocast" if training_args.fp16 else "fp32"
    logger.info("precision: %s (master weights fp32)", precision)
    trainer = ThreadedAccumulationTrainer(
        model=run.model,
        args=training_args,
        train_dataset=run.data.train,
        eval_dataset=run.data.eval,
        processing_class=run.tokenizer,
        data_collator=DataCollatorForSeq2Seq(run.tokenizer, label_pad_token_id=data_mod.IGNORE_INDEX, padding=True),
        callbacks=callbacks,
        grad_workers=resolve_workers(
            run_args.grad_workers, training_args.device.type, training_args.world_size, run.model.num_parameters()
        ),
        max_consecutive_skipped_steps=run_args.max_consecutive_skipped_steps,
    )
    # ProgressCallback logs one readable line per logging step; the Trainer's
    # printer (used when tqdm is off) would repeat it as a raw dict on stdout.
    trainer.remove_callback(PrinterCallback)
    return trainer


def fit(
    trainer: ThreadedAccumulationTrainer, run: Run, stop_requested: threading.Event, seed: int
) -> tuple[float | None, float]:
    """Train the remaining segments of the plan, each ending on a checkpoint, and verify every end.

    The gradient worker threads are joined before this returns or raises, so
    nothing after it (evaluation, generation, export) runs beside them.

    Returns:
        ``(mean training loss over the steps trained by this call or None if none were
        left, seconds inside Trainer.train)``: the latter is the Trainer's ``train_runtime``
        summed over the segments.

    Raises:
        TrainingInterrupted: a stop was requested; a checkpoint was saved at the current step.
        TrainingError: a segment ended at another step than planned.
    """
    step = run.plan.start_step + run.done_steps
    resume = run.checkpoint.path if run.checkpoint else None
    loss_sum, trained, seconds = 0.0, 0, 0.0
    try:
        for epoch, first_batch, steps in run.plan.segments(run.done_steps):
            trainer.train_dataset = segment_dataset(run, epoch, first_batch, steps, seed)
            trainer.args.max_steps = step + steps
            output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            reached = trainer.state.global_step
            seconds += output.metrics.get("train_runtime", 0.0)
            if reached < step + steps and stop_requested.is_set():
                raise TrainingInterrupted(f"stopped at step {reached} of {run.plan.max_steps}; checkpoint saved")
            if reached != step + steps:
                raise TrainingError(f"training ended at global_step {reached}, planned {step + steps}")
            loss_sum, trained, step = loss_sum + output.training_loss * steps, trained + steps, reached
            resume = Path(str(trainer.args.output_dir)) / f"checkpoint-{step}"
            if stop_requested.is_set() and step < run.plan.max_steps:
                raise TrainingInterrupted(f"stopped at step {step} of {run.plan.max_steps}; checkpoint saved")
    finally:
        trainer.shutdown_workers()
    return (loss_sum / trained if trained else None), seconds


def export_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output_dir: str | Path) -> None:
    """Save model and tokenizer to the root of ``output_dir``, loadable with ``from_pretrained``.

    Files are written to a temporary folder first and moved in one by one with
    ``os.replace``, so no file is ever half-written at its final name.
    """
    root = Path(output_dir)
    tmp = root / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for item in tmp.iterdir():
        os.replace(item, root / item.name)
    tmp.rmdir()


def train_file(
    model_args: ModelArguments,
    data_args: DataArguments,
    run_args: RunArguments,
    training_args: ContinualTrainingArguments,
) -> dict[str, Any]:
    """Train one file end to end and record it (status, history, snapshot).

    Returns:
        The file's ``history.jsonl`` row.

    Raises:
        DaemonError: a user-facing failure; a ``failed`` history row has been written
            (except for :class:`TrainingInterrupted`, which leaves the file unfinished).
    """
    is_main = training_args.process_index == 0
    status = StatusFile(run_args.status_dir) if is_main else None
    heartbeat = Heartbeat(status, run_args.status_interval) if status else None
    name = Path(data_args.dataset or "").name
    started = time.monotonic()
    stop_requested = threading.Event()
    ledger = Ledger(run_args.status_dir)
    run: Run | None = None
    entry: Entry | None = None
    try:
        if heartbeat:
            heartbeat.set(state="loading", current_file={"name": name})
            heartbeat.flush()
            heartbeat.start()
        with _stop_on_signals(stop_requested):
            run = setup(model_args, data_args, training_args, ledger, heartbeat, run_args.ledger_entry)
            if is_main:
                entry = record_plan(ledger, run, run_args.ledger_entry)
            _beat(heartbeat, state="training", max_steps=run.plan.max_steps, current_file=dict(run.current_file))
            trainer = build_trainer(run, run_args, training_args, [PlanCallback(stop_requested)])
            trainer.add_callback(
                ProgressCallback(heartbeat, run.plan, run.current_file, run.data.train_tokens, trainer.guard)
            )
            train_loss, train_seconds = fit(trainer, run, stop_requested, training_args.seed)
        _beat(heartbeat, state="evaluating")
        eval_loss = trainer.evaluate()["eval_loss"] if run.data.eval is not None else None
        row = _history_row(
            run, name, started, "done", train_loss=train_loss, eval_loss=eval_loss, train_seconds=train_seconds
        )
        if is_main:
            assert status is not None and entry is not None
            _beat(heartbeat, state="saving")
            _save_and_record(run, row, status, ledger, entry, run_args, training_args)
            _beat(heartbeat, state="idle", global_step=run.plan.max_steps, current_file=None)
        return row
    except TrainingInterrupted:
        _beat(heartbeat, state="stopped")
        raise
    except DaemonError as e:
        if status is not None:
            status.record_outcome(HistoryRow(**_history_row(run, name, started, "failed", error=str(e))))
        failed_id = entry.id if entry is not None else run_args.ledger_entry
        if is_main and failed_id is not None:
            ledger.update(failed_id, state="failed", error=str(e))
        _beat(heartbeat, state="failed")
        raise
    finally:
        if heartbeat:
            heartbeat.stop()


def _save_and_record(
    run: Run,
    row: dict[str, Any],
    status: StatusFile,
    ledger: Ledger,
    entry: Entry,
    run_args: RunArguments,
    training_args: TrainingArguments,
) -> None:
    """Samples, export, snapshot, then the records; each step may be repeated after a crash."""
    eval_loss = row["eval_loss"]
    if eval_loss is not None:
        status.update(_count_eval(run.plan.max_steps, row["file"], eval_loss))
    settings = GenerationSettings(
        max_new_tokens=run_args.sample_max_new_tokens,
        temperature=run_args.sample_temperature,
        top_k=run_args.sample_top_k,
        seed=training_args.seed,
    )
    samples = generate_samples(run.model, run.tokenizer, run_args.sample_prompts, settings)
    export_model(run.model, run.tokenizer, str(training_args.output_dir))
    folder = write_snapshot(
        run_args.status_dir,
        run.plan.max_steps,
        run.report.path.name,
        eval_loss,
        run.data.eval_examples,
        settings,
        samples,
    )
    logger.info("exported the model to %s; snapshot in %s", training_args.output_dir, folder)
    status.record_outcome(
        HistoryRow(**row)
    )  # before the ledger: a crash in between finishes again without a second row
    ledger.update(entry.id, state="done", end_step=run.plan.max_steps)


def _history_row(
    run: Run | None,
    name: str,
    started: float,
    outcome: str,
    *,
    train_loss: float | None = None,
    eval_loss: float | None = None,
    train_seconds: float | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    plan = run.plan if run else None
    return {
        "file": name,
        "sha256": run.report.sha256 if run else None,
        "start_step": plan.start_step if plan else None,
        "end_step": plan.max_steps if plan and outcome == "done" else None,
        "planned_steps": plan.steps_for_file if plan else None,
        "examples": run.data.train_examples if run else None,
        "tokens": run.data.train_tokens if run else None,
        "wall_seconds": round(time.monotonic() - started, 2),
        "train_seconds": None if train_seconds is None else round(train_seconds, 2),
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        "outcome": outcome,
        "error": error,
        "finished_at": utc_now(),
    }


def _count_eval(step: int, name: str, eval_loss: float) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["total_evals"] = doc.get("total_evals", 0) + 1
        doc["last_eval"] = {"step": step, "file": name, "eval_loss": eval_loss, "perplexity": perplexity(eval_loss)}

    return mutate


def _beat(heartbeat: Heartbeat | None, **fields: Any) -> None:
    if heartbeat is not None:
        heartbeat.set(progress_at=time.time(), **fields)
        heartbeat.flush()


@contextmanager
def _stop_on_signals(stop_requested: threading.Event) -> Iterator[None]:
    """First SIGINT/SIGTERM sets ``stop_requested`` (checkpoint, then stop); a second one exits at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop_requested.is_set():
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        logger.warning("%s: saving a checkpoint at the next step, then stopping", signal.Signals(signum).name)
        stop_requested.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _exit_with_supervisor(pid: int) -> None:
    """Kill this process group once the daemon ``pid`` is gone (e.g. SIGKILLed).

    The daemon starts each child in a session of its own (so a terminal's Ctrl-C
    reaches only the daemon); without this, a killed daemon would leave an orphan
    training on and racing the next daemon's child for the same checkpoints.
    """

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                logger.error("the daemon (pid %d) is gone: stopping this training process group", pid)
                os.killpg(0, signal.SIGKILL)
            except PermissionError:  # alive, owned by another user
                pass

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def check_args_main(argv: list[str]) -> int:
    """``python -m daemon check-args [flags]``: validate training flags only (the daemon calls it at start)."""
    try:
        parse_args(argv)
    except DaemonError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python train.py --dataset FILE.jsonl [flags]``: train one file; returns the exit code.

    Exit codes: 0 trained, 1 a user-facing error (one line on stderr), 2 bad usage
    (argparse), 3 interrupted by a signal after checkpointing.
    """
    configure_logging()
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get(SUPERVISOR_ENV):
        _exit_with_supervisor(int(os.environ[SUPERVISOR_ENV]))
    try:
        model_args, data_args, run_args, training_args = parse_args(argv)
        if not data_args.dataset:
            raise ConfigError("--dataset FILE.jsonl is required")
        if not sys.stderr.isatty():  # \r-progress bars are noise in a log file or a pipe
            import datasets
            import transformers

            datasets.disable_progress_bars()
            transformers.utils.logging.disable_progress_bar()
        row = train_file(model_args, data_args, run_args, training_args)
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except DaemonError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    print(
        f"trained {row['file']}: steps {row['start_step']} -> {row['end_step']} "
        f"({row['planned_steps']} steps, {row['examples']} examples), train_loss {row['train_loss']:.4f}"
        + (f", eval_loss {row['eval_loss']:.4f}" if row["eval_loss"] is not None else ""),
        flush=True,
    )
    return 0
