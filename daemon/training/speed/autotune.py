"""``--grad_workers auto`` on CPU: a short measurement, cached per machine and model shape.

Whether worker threads beat the stock Trainer step depends on the CPU and the size of each
op, not on anything a flag or ``/proc/cpuinfo`` says: 2 workers were faster or slower than the
stock step on the same model between CPUs, and between goes on one CPU (BENCHMARKS.md, "Measurements behind the code").
So, the first time a machine trains a model shape, :func:`choose_workers` times a few forward
and backward passes of one micro-batch of random tokens each way (seconds for the embedded
model, longer for a larger one) and keeps the faster; the answer
is cached in ``$XDG_CACHE_HOME/continual-daemon/grad_workers.json`` (default
``~/.cache``), keyed by :func:`shape_key`, so later files and runs read it. Delete the file
to measure again.

A measurement taken while other work held the CPU is taken again by the next training process
(:func:`choose_workers` says how often): a training process left running beside one made it
cache the stock step, where the same machine, quiet, had 2 workers faster every time
(BENCHMARKS.md, "Measurements behind the code"). :class:`OtherLoad`
reads the share of the CPU that went elsewhere from the kernel's counters.

The measurement leaves the model as it found it: no gradient, the same train/eval mode and
the same torch RNG state (dropout draws from it), so training after it is the same as without.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from daemon.store.files import atomic_write_text
from daemon.store.status import mark_progress
from daemon.training.arguments import cpu_info
from daemon.training.speed import allocator
from daemon.training.speed.accumulation import ShardPool, split_batch

logger = logging.getLogger(__name__)

# Timed passes per path, after one warm-up each, alternated; the fastest of each counts. At least
# MIN, then more until MEASUREMENT_SECONDS of passes or MAX: three passes each (the earlier rule)
# put 2 workers at 1.01x to 1.13x the stock step on the same machine and shape where ten gave
# 1.08x to 1.11x and the training loop ran 1.12x faster on them (BENCHMARKS.md, "Measurements
# behind the code"): with three, a 5 % gain was as often missed as seen.
MIN_MEASURED_MICRO_BATCHES = 3
MAX_MEASURED_MICRO_BATCHES = 10
MEASUREMENT_SECONDS = 6.0
# Cached choices made by another rule (no "method", or an older one) are measured again.
MEASUREMENT_METHOD = 2
# Worker threads must win by this much: within it, the stock step (the peer's path) is kept.
MIN_GAIN = 1.05
# Above this share of the CPU time going to other processes or the hypervisor during the
# measurement, its choice is contended: the next training process measures again, up to this many
# contended measurements in a row (a larger model's measurement is not short).
MAX_OTHER_LOAD = 0.10
MAX_CONTENDED_MEASUREMENTS = 3
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cache_path() -> Path:
    """Where the measured choices live: ``$XDG_CACHE_HOME/continual-daemon/grad_workers.json``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "continual-daemon" / "grad_workers.json"


def use_compile_cache() -> Path:
    """Point inductor's compile cache at ``$XDG_CACHE_HOME/continual-daemon/inductor`` and return it.

    Each file trains in a new process, and ``torch.compile`` compiles again in every process
    unless the compiled kernels and graphs are found on disk (inductor's FX graph and
    autograd caches, on by default). Its own default, ``/tmp/torchinductor_<user>``, is lost at
    a reboot; this folder is kept, so only the first file of a model shape pays for compiling.
    ``TORCHINDUCTOR_CACHE_DIR`` set to another folder is kept (importing transformers already
    sets it to inductor's default, which is replaced). Must run before the first compilation.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_path().parent / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def _cpu_name_and_flags() -> str:
    name, flags = cpu_info()
    return " ".join([name or platform.processor() or platform.machine(), *(f for f in CPU_FLAGS if f in flags)])


class OtherLoad:
    """The share of this process's CPUs that went to other work while a block ran.

    Use as ``with OtherLoad() as load: ...``; afterwards ``load.share`` is in [0, 1], or ``None``
    where the kernel's counters cannot be read (not Linux). Other work is the CPUs' busy time
    (``/proc/stat``: every state but idle and iowait, the hypervisor's steal included) minus this
    process's own CPU time (:func:`time.process_time`, all its threads), over the CPUs' total time.
    The CPUs are those the process may run on (``os.sched_getaffinity``): a container's cpuset, not
    the whole host. Counters tick at ``USER_HZ`` (100 Hz), so a block of a few seconds on 2 cores
    measures it to within about 1 %.
    """

    def __init__(self, stat: str | Path = "/proc/stat") -> None:
        self.stat = Path(stat)
        self.share: float | None = None
        self._start: tuple[int, int, float] | None = None

    def _read(self) -> tuple[int, int, float] | None:
        """``(total ticks, busy ticks, own CPU seconds)`` now, or ``None``."""
        try:
            cpus = {f"cpu{n}" for n in os.sched_getaffinity(0)}
            lines = self.stat.read_text().splitlines()
        except (OSError, AttributeError):  # no /proc, or no sched_getaffinity (macOS)
            return None
        total = busy = 0
        for fields in map(str.split, lines):
            if fields and fields[0] in cpus:
                # user nice system idle iowait irq softirq steal (guest time is inside user)
                ticks = [int(x) for x in fields[1:9]]
                total += sum(ticks)
                busy += sum(ticks) - ticks[3] - ticks[4]
        return (total, busy, time.process_time()) if total else None

    def __enter__(self) -> OtherLoad:
        self._start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._read()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return
        total, busy, own = (b - a for a, b in zip(self._start, end, strict=True))
        own_ticks = own * os.sysconf("SC_CLK_TCK")
        self.share = min(1.0, max(0.0, (busy - own_ticks) / total))


def shape_key(model: torch.nn.Module, batch_size: int, seq_len: int, bf16: bool, workers: int) -> str:
    """What the measured choice depends on: the CPU (name and vector flags), torch and its thread
    count, the model's shape, the micro-batch (rows x tokens), the precision, the worker count tried
    and the allocator (:mod:`daemon.training.speed.allocator` speeds the stock step more than the workers).
    """
    config = getattr(model, "config", None)
    shape = [getattr(config, name, None) for name in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")]
    params = sum(p.numel() for p in model.parameters())
    return " | ".join(
        [
            _cpu_name_and_flags(),
            f"torch {torch.__version__} x{torch.get_num_threads()}",
            f"{' '.join(map(str, shape))} {params} params",
            f"micro-batch {batch_size}x{seq_len}",
            "bf16" if bf16 else "fp32",
            f"{workers} workers",
            "malloc keeps freed memory" if allocator.kept else "malloc defaults",
        ]
    )


def measure_seconds(
    model: torch.nn.Module, batch_size: int, seq_len: int, bf16: bool, workers: int
) -> tuple[float, float, float | None]:
    """Seconds of one micro-batch's forward and backward: the stock step's, then ``workers`` threads'.

    Args:
        model: a causal LM taking ``input_ids`` and ``labels`` (its ``.loss``: mean nats a token).
        batch_size, seq_len: the micro-batch, ``[batch_size, seq_len]`` random token ids.
        bf16: under CPU bf16 autocast, as training would be.
        workers: worker threads of the threaded path (>= 2).

    Returns:
        ``(stock, threaded, other_load)`` in seconds: the fastest of
        :data:`MIN_MEASURED_MICRO_BATCHES` to :data:`MAX_MEASURED_MICRO_BATCHES` timed passes each
        (more while the timed passes took under :data:`MEASUREMENT_SECONDS`), alternated so that a
        noisy neighbour slows both alike, and the share of the CPU that other work took meanwhile
        (:class:`OtherLoad`; ``None`` where unknown).
    """
    vocab = int(getattr(model.config, "vocab_size", 2))  # type: ignore[union-attr]
    params = [p for p in model.parameters() if p.requires_grad]
    was_training, rng = model.training, torch.random.get_rng_state()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
    batch = {"input_ids": tokens, "labels": tokens}
    pool = ShardPool(workers, max(1, torch.get_num_threads() // workers))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    def stock() -> None:
        with autocast:
            loss = model(**batch).loss
        loss.backward()

    def shard(piece: dict[str, Any]) -> tuple[torch.Tensor | None, ...]:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            loss = model(**piece).loss
        return torch.autograd.grad(loss, params, allow_unused=True)

    def threaded() -> None:
        for grads in pool.map(shard, split_batch(batch, workers)):
            for param, grad in zip(params, grads, strict=True):
                if grad is not None:
                    param.grad = grad if param.grad is None else param.grad.add_(grad)

    times: dict[str, list[float]] = {"stock": [], "threaded": []}
    try:
        model.train()
        with OtherLoad() as load:
            for repeat in range(MAX_MEASURED_MICRO_BATCHES + 1):
                timed = sum(times["stock"]) + sum(times["threaded"])
                if repeat > MIN_MEASURED_MICRO_BATCHES and timed >= MEASUREMENT_SECONDS:
                    break
                for name, run in (("stock", stock), ("threaded", threaded)):
                    started = time.perf_counter()
                    run()
                    if repeat:  # the first pass of each warms caches and the allocator
                        times[name].append(time.perf_counter() - started)
                    mark_progress()  # a measurement is progress: the daemon's stall detection reads it
                    for param in params:
                        param.grad = None
    finally:
        pool.shutdown()
        model.train(was_training)
        torch.random.set_rng_state(rng)
    return min(times["stock"]), min(times["threaded"]), load.share


def choose_workers(model: torch.nn.Module, batch_size: int, seq_len: int, bf16: bool, workers: int) -> int:
    """``workers`` if they beat the stock step by :data:`MIN_GAIN` on this machine and shape, else 0.

    Read from :func:`cache_path` when this :func:`shape_key` was measured before by this
    :data:`MEASUREMENT_METHOD`; else measured
    (:func:`measure_seconds`) and cached. A measurement during which other work took over
    :data:`MAX_OTHER_LOAD` of the CPU is cached as contended, and the next training processes
    measure again, until one measures on a quiet CPU or :data:`MAX_CONTENDED_MEASUREMENTS` in a row
    were contended (a machine that is always busy then keeps the last, instead of paying for a
    measurement every file). An unreadable or unwritable cache only costs a new measurement: it
    never fails a file.
    """
    key, path = shape_key(model, batch_size, seq_len, bf16, workers), cache_path()
    try:
        cached = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        cached = None
    contended = 0
    if isinstance(cached, dict) and cached.get("method") != MEASUREMENT_METHOD:
        cached = None  # chosen by an earlier, shorter measurement
    if isinstance(cached, dict) and isinstance(cached.get("workers"), int):
        contended = int(cached.get("contended_measurements", 0))
        if contended == 0 or contended >= MAX_CONTENDED_MEASUREMENTS:
            logger.info("--grad_workers auto: %d (measured %s, cached in %s)", cached["workers"], cached["at"], path)
            return int(cached["workers"])
    stock, threaded, other_load = measure_seconds(model, batch_size, seq_len, bf16, workers)
    chosen = workers if stock > threaded * MIN_GAIN else 0
    contended = contended + 1 if other_load is not None and other_load > MAX_OTHER_LOAD else 0
    measured = f"a micro-batch took {stock:.3f} s on the stock step, {threaded:.3f} s on {workers} workers"
    if contended:
        left = MAX_CONTENDED_MEASUREMENTS - contended
        logger.warning(
            "--grad_workers auto: %d (%s, while other work took %.0f%% of the CPU: %s; cached in %s)",
            chosen,
            measured,
            100 * (other_load or 0.0),
            f"measured again by the next training process, {left} more at most" if left else "kept, busy as it is",
            path,
        )
    else:
        logger.info("--grad_workers auto: %d (%s; cached in %s)", chosen, measured, path)
    record = {
        "workers": chosen,
        "stock_seconds": stock,
        "threaded_seconds": threaded,
        "other_load": other_load,
        "contended_measurements": contended,
        "method": MEASUREMENT_METHOD,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                doc = {}
            doc = doc if isinstance(doc, dict) else {}
            atomic_write_text(path, json.dumps({**doc, key: record}, indent=1) + "\n")
    except OSError as e:
        logger.warning("could not cache the --grad_workers choice in %s: %s", path, e)
    return chosen
