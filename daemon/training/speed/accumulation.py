"""Multi-thread CPU gradient accumulation with a gradient guard (docs/speed.md "Multi-thread ...").

On CPU, each micro-batch is split along the batch dimension into up to N shards
that a persistent pool of N worker threads computes concurrently. Each thread
runs the forward pass and ``torch.autograd.grad`` for its shard, so it gets its
gradients as new tensors and never writes a shared ``.grad``; the main thread
checks every shard's gradients and adds the finite ones into ``.grad``.

Exactness: the Trainer passes ``num_items_in_batch`` (the learned tokens of the
whole optimizer step, over all accumulated micro-batches) and the model's loss
is ``sum of token losses / num_items_in_batch`` (transformers ``ForCausalLMLoss``).
That loss is a sum over tokens, so the gradients of the shards add up to the
gradient of the micro-batch: the stock Trainer's gradient, up to float rounding.

The guard: a shard whose loss or gradient holds NaN/Inf is dropped and counted,
and its tokens leave the normalisation (the step's gradient is rescaled by
``items / (items - dropped_items)``). If no shard of a step is finite, every
``.grad`` is cleared so the optimizer leaves the parameters bitwise unchanged,
the scheduler is not advanced, and the step is counted as skipped; after
``max_consecutive_skipped_steps`` skipped steps in a row the run fails.

Intra-op threads: ``torch.set_num_threads`` sets the calling thread's OpenMP
team size, so each worker sets ``max(1, cores // N)`` once at start: N workers
times intra-op threads never exceeds the cores (no oversubscription).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import Trainer

from daemon.exceptions import ConfigError, TrainingError
from daemon.training.distillation import distilled_causal_lm_loss, teacher_logits
from daemon.training.evaluation import autocast_dtype
from daemon.training.loss_weights import DISTILLATION, LOSS_WEIGHT, ROW_COLUMNS, weighted_causal_lm_loss, weighted_items

logger = logging.getLogger(__name__)

WORKER_THREAD_PREFIX = "grad-worker"
# What `--grad_workers auto` tries on a CPU run, from bench/accumulation.py (BENCHMARKS.md):
# 2 workers against the stock step went either way on the same model and CPU, and between goes on
# one CPU (BENCHMARKS.md, "Measurements behind the code"). So a measurement on the machine decides
# (:func:`daemon.training.speed.autotune.choose_workers`), up to the size where it would take over a minute on
# 2 cores (it grows with the model); larger models, measured nowhere, take the stock step.
AUTO_WORKERS = 2
AUTO_MAX_PARAMETERS = 50_000_000


def resolve_workers(
    spec: str,
    device_type: str,
    world_size: int,
    num_parameters: int,
    cores: int | None = None,
    measure: Callable[[int], int] | None = None,
    compiled: bool = False,
    sharded: bool = False,
) -> int:
    """The number of gradient worker threads for ``--grad_workers spec``.

    Args:
        spec: ``"auto"`` or a whole number (0 = the stock Trainer path). ``auto``: 0 above
            :data:`AUTO_MAX_PARAMETERS` parameters; else ``n = min(AUTO_WORKERS, cores)``,
            or what ``measure(n)`` returns (``n`` or 0) when given and ``n >= 2``.
        device_type: ``"cpu"``, ``"cuda"``, ...; any accelerator uses the stock path.
        world_size: processes in the run; distributed runs use the stock path (DDP
            reduces gradients in ``backward``, which ``torch.autograd.grad`` bypasses).
        num_parameters: the model's parameter count.
        cores: CPU cores to share (default: ``torch.get_num_threads()``).
        measure: decides between ``n`` workers and the stock step on this machine.
        compiled: ``--torch_compile`` is on: ``auto`` takes the stock step. Compiled code is
            not shared between the worker threads' half batches and the whole micro-batch (other
            shapes), and dynamo compiles one thread at a time: a file compiled on 2 workers
            trained more than twice as long as on the stock step (BENCHMARKS.md, "Measurements behind the code").
        sharded: an FSDP run (:mod:`daemon.training.sharding`, which refuses an explicit ``N > 0``):
            the stock step, whose ``backward`` runs FSDP's reduce-scatter.

    Raises:
        ConfigError: ``spec`` is not ``auto`` or a whole number.
    """
    if spec != "auto" and not spec.isdigit():
        raise ConfigError("--grad_workers must be a whole number or 'auto'")
    if device_type != "cpu" or world_size > 1 or sharded:
        return 0
    if spec != "auto":
        return int(spec)
    if compiled or num_parameters > AUTO_MAX_PARAMETERS:
        return 0
    workers = min(AUTO_WORKERS, cores or torch.get_num_threads())
    return measure(workers) if measure is not None and workers >= 2 else workers


def split_batch(inputs: dict[str, Any], shards: int) -> list[dict[str, Any]]:
    """Split a micro-batch along dimension 0 into at most ``shards`` parts of near-equal size.

    Args:
        inputs: tensors of shape ``[batch, ...]`` (non-tensors are passed to every shard).
        shards: wanted number of shards; fewer when the batch has fewer rows.

    Returns:
        A list of shard dicts; sizes differ by at most one row (``torch.tensor_split``).
    """
    rows = next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor))
    n = max(1, min(shards, rows))
    parts = {k: v.tensor_split(n) if isinstance(v, torch.Tensor) else [v] * n for k, v in inputs.items()}
    return [{k: parts[k][i] for k in inputs} for i in range(n)]


@dataclass
class GuardCounters:
    """What the gradient guard counted; reported as the status's ``gradient_guard``."""

    workers: int = 0
    dropped_shards: int = 0
    skipped_steps: int = 0
    consecutive_skipped: int = 0

    def as_status(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.pop("consecutive_skipped")
        return doc


@dataclass
class _ShardResult:
    loss: torch.Tensor
    grads: tuple[torch.Tensor | None, ...]
    items: float

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.loss)) and all_finite([g for g in self.grads if g is not None])


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (no NaN, no +-Inf).

    One fused pass per device and dtype, with the check of torch's ``GradScaler``
    (``torch._amp_foreach_non_finite_check_and_unscale_``, as ``torch/amp/grad_scaler.py`` groups
    it) at a scale of exactly 1, which leaves every value as it was: several times faster than
    ``torch.isfinite(g).all()`` per tensor (four passes and a boolean tensor each), which with 2
    workers was half of the main thread's time in a Trainer step (torch.profiler; BENCHMARKS.md,
    "Measurements behind the code").
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    for (device, _), group in groups.items():
        found_inf, one = torch.zeros(1, device=device), torch.ones(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, one)
        if found_inf.item():
            return False
    return True


class ShardPool:
    """A persistent pool of worker threads, each limited to ``intra_op_threads`` torch threads.

    Args:
        workers: number of threads (>= 1).
        intra_op_threads: torch intra-op threads per worker.
    """

    def __init__(self, workers: int, intra_op_threads: int) -> None:
        self.workers = workers
        self.intra_op_threads = intra_op_threads
        self._executor = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix=WORKER_THREAD_PREFIX,
            initializer=torch.set_num_threads,
            initargs=(intra_op_threads,),
        )

    def map(self, fn: Any, items: list[Any]) -> list[Any]:
        """``[fn(item) for item in items]`` computed on the workers; re-raises a worker's exception."""
        return list(self._executor.map(fn, items))

    def shutdown(self) -> None:
        """Stop and join every worker thread (idempotent)."""
        self._executor.shutdown(wait=True, cancel_futures=True)


def worker_threads_alive() -> list[str]:
    """Names of live gradient worker threads (empty once every pool is shut down)."""
    return [t.name for t in threading.enumerate() if t.name.startswith(WORKER_THREAD_PREFIX) and t.is_alive()]


class ThreadedAccumulationTrainer(Trainer):
    """A ``Trainer`` whose ``training_step`` computes shards on worker threads and guards the gradients.

    With ``grad_workers=0`` every method is the stock one, except that the guard
    still counts nothing and reports zero workers.

    Args:
        grad_workers: worker threads (0 = stock path).
        max_consecutive_skipped_steps: fail the run after this many skipped steps in a row.
        *args, **kwargs: passed to ``Trainer``.
    """

    def __init__(self, *args: Any, grad_workers: int = 0, max_consecutive_skipped_steps: int = 10, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.grad_workers = grad_workers
        self.max_consecutive_skipped_steps = max_consecutive_skipped_steps
        self.guard = GuardCounters(workers=grad_workers)
        self.shard_pool: ShardPool | None = None
        self.teacher: torch.nn.Module | None = None  # --replay_distillation: the model as the file started, frozen
        self._reset_step()

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # A checkpoint stores a tied weight once (safetensors keeps one copy of shared tensors),
        # so lm_head.weight is "missing" from it while it shares the loaded embedding. transformers
        # 5's Trainer only recognises ``_keys_to_ignore_on_save`` and warned on every resume. A
        # missing key is dropped from the warning only while its tie is in effect (same tensor).
        model = self.accelerator.unwrap_model(self.model)
        tied = getattr(model, "all_tied_weights_keys", None) or {}

        def shares_its_source(key: str) -> bool:
            try:
                return key in tied and model.get_parameter(key) is model.get_parameter(tied[key])
            except AttributeError:
                return False

        missing = [key for key in load_result.missing_keys if not shares_its_source(key)]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _set_signature_columns_if_needed(self) -> None:
        # The Trainer drops the dataset columns its model's forward does not take; the row columns
        # (--replay_loss_weight's, --replay_distillation's) are read by compute_loss, not the model.
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None:
            self._signature_columns += [c for c in ROW_COLUMNS if c not in self._signature_columns]

    @property
    def _loss_over_num_items(self) -> bool:
        # The Trainer's own condition for dividing a loss by num_items_in_batch (its count and its scaling).
        return bool(self.model_accepts_loss_kwargs or self.compute_loss_func is not None)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | int | None:
        """The step's learned tokens, each counted with its row's ``loss_weight`` where the rows carry a row column.

        Without weights, the Trainer's own count; with them the same count over
        :func:`~daemon.training.loss_weights.weighted_items`, summed over the processes as the Trainer
        sums its own (``average_tokens_across_devices``).
        """
        if not batch_samples or not any(c in batch_samples[0] for c in ROW_COLUMNS) or not self._loss_over_num_items:
            return super()._get_num_items_in_batch(batch_samples, device)
        items = torch.stack([weighted_items(batch) for batch in batch_samples]).sum().to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            items = self.accelerator.gather(items).sum()
        return items / (self.get_tp_size() * self.get_cp_size() * self.get_sp_size())

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """The stock loss, or with a ``loss_weight`` per row the weighted one
        (:func:`~daemon.training.loss_weights.weighted_causal_lm_loss`) over ``num_items_in_batch``, plus the
        distilled rows' KL to :attr:`teacher` over the same count (:mod:`daemon.training.distillation`)."""
        if not any(c in inputs for c in ROW_COLUMNS):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        forward = {k: v for k, v in inputs.items() if k not in (*ROW_COLUMNS, "labels")}
        outputs = model(**forward)
        labels = inputs["labels"]
        weights = inputs[LOSS_WEIGHT] if LOSS_WEIGHT in inputs else torch.ones(labels.shape[0])
        items = weighted_items(inputs) if num_items_in_batch is None else num_items_in_batch
        distilled = inputs.get(DISTILLATION)
        if distilled is not None and self.teacher is not None and bool((rows := distilled > 0).any()):
            precision = autocast_dtype(self.args.bf16, self.args.fp16)
            target = teacher_logits(self.teacher, forward, rows.to(labels.device), precision)
            loss = distilled_causal_lm_loss(outputs.logits, labels, weights, rows, distilled[rows], target, items)
        else:
            loss = weighted_causal_lm_loss(outputs.logits, labels, weights, items)
        if self.args.average_tokens_across_devices and self._loss_over_num_items and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as the Trainer scales its own
        return (loss, outputs) if return_outputs else loss

    def _reset_step(self) -> None:
        self._micro_batches = 0
        self._step_items = 0
        self._step_dropped_items = 0
        self._step_finite_shards = 0

    def _ensure_pool(self) -> ShardPool:
        if self.shard_pool is None:
            cores = torch.get_num_threads()
            self.shard_pool = ShardPool(self.grad_workers, max(1, cores // self.grad_workers))
            logger.info(
                "gradient accumulation on %d worker threads x %d intra-op threads (%d cores)",
                self.grad_workers,
                self.shard_pool.intra_op_threads,
                cores,
            )
        return self.shard_pool

    def shutdown_workers(self) -> None:
        """Join the worker threads; called before anything else uses the model."""
        if self.shard_pool is not None:
            self.shard_pool.shutdown()
            self.shard_pool = None

    def release_model(self) -> None:
        """Once training is over: join the worker threads and take autocast off the model's ``forward``.

        For bf16/fp16 training accelerate's ``prepare_model`` replaces ``model.forward`` with one
        that runs under autocast, and leaves it there after training; every later forward would
        run under the training's autocast. The snapshot samples then took several times as long
        on a GPU (every weight cast to bf16 again for every new token; BENCHMARKS.md, "Measurements behind the code").
        The evaluation suite enters the training precision's autocast itself.
        """
        self.shutdown_workers()
        self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """One micro-batch: shards on the workers, finite gradients summed into ``.grad``.

        Falls back to the stock step when there are no workers or when the model
        does not take ``num_items_in_batch`` (shard losses would not add up).

        Returns:
            The micro-batch's loss over its finite shards (detached), as the stock step returns.

        Raises:
            TrainingError: ``max_consecutive_skipped_steps`` steps in a row had no finite shard.
        """
        if not self.grad_workers or num_items_in_batch is None or not self.model_accepts_loss_kwargs:
            return super().training_step(model, inputs, num_items_in_batch)
        pool = self._ensure_pool()
        model.train()
        inputs = self._prepare_inputs(inputs)
        params = [p for p in model.parameters() if p.requires_grad]

        def shard_gradients(shard: dict[str, Any]) -> _ShardResult:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, shard, num_items_in_batch=num_items_in_batch)
            assert isinstance(loss, torch.Tensor)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            items = float(weighted_items(shard)) if "labels" in shard else 0.0
            return _ShardResult(loss.detach(), grads, items)

        results = pool.map(shard_gradients, split_batch(inputs, pool.workers))
        total = torch.zeros((), device=self.args.device)
        for result in results:
            self._step_items += result.items
            if not result.is_finite():
                self.guard.dropped_shards += 1
                self._step_dropped_items += result.items
                continue
            self._step_finite_shards += 1
            total += result.loss
            for param, grad in zip(params, result.grads, strict=True):
                if grad is not None:
                    param.grad = grad if param.grad is None else param.grad.add_(grad)
        self._micro_batches += 1
        if self._micro_batches >= self.current_gradient_accumulation_steps:
            self._finish_accumulation(params)
        return total

    def _finish_accumulation(self, params: list[torch.nn.Parameter]) -> None:
        kept_items = self._step_items - self._step_dropped_items
        skip = self._step_finite_shards == 0 or kept_items <= 0
        if skip:
            for param in params:
                param.grad = None  # the optimizer skips parameters without a gradient: bitwise unchanged
            self.guard.skipped_steps += 1
            self.guard.consecutive_skipped += 1
            logger.warning(
                "optimizer step skipped: no finite gradient shard (%d in a row)", self.guard.consecutive_skipped
            )
        else:
            self.guard.consecutive_skipped = 0
            if self._step_dropped_items:
                scale = self._step_items / kept_items  # dropped tokens leave the num_items_in_batch normalisation
                for param in params:
                    if param.grad is not None:
                        param.grad.mul_(scale)
        # accelerate's flag for a skipped step (set by its fp16 scaler otherwise); the Trainer
        # checks it before advancing the scheduler, and AcceleratedOptimizer.step leaves it as is.
        if self.optimizer is not None and hasattr(self.optimizer, "_is_overflow"):
            self.optimizer._is_overflow = skip
        self._reset_step()
        if self.guard.consecutive_skipped >= self.max_consecutive_skipped_steps:
            raise TrainingError(
                f"{self.guard.consecutive_skipped} optimizer steps in a row had no finite gradient "
                "(NaN/Inf in every shard); stopping instead of looping"
            )
