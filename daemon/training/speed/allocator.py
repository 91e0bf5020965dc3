"""glibc malloc settings for a training process (torch-free: set before torch is imported).

A training step allocates its activations and gradients and frees them all by the step's end.
With glibc's defaults the freed memory goes back to the kernel: a block over the dynamic mmap
threshold (at most 32 MiB; the logits of a micro-batch of 8 x 256 tokens over a 4096-token
vocabulary are 32 MiB) is its own ``mmap`` and is unmapped when freed, and the heap's top is
trimmed. Every step then faults the same pages in again, each zeroed by the kernel: system
time, a share of the CPU that grows with the activations (SmolLM2-135M's step of 8 x 256 tokens
over its 49,152-token vocabulary: fp32 logits of 384 MiB, several such blocks a step, about
a million faults a step). Keeping the freed memory in the heap removes most of the faults and
shortens the step (BENCHMARKS.md, "Measurements behind the code";
``bench/end_to_end.py`` measures whole runs with and without it). The PyTorch CPU
performance tuning guide ("Switch Memory allocator") makes the same point for jemalloc and
tcmalloc; glibc's own ``mallopt`` does it without a new dependency.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h); values in bytes.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2): smaller blocks come from the heap.
MMAP_THRESHOLD_BYTES = 32 << 20
# The free space the heap keeps at its top when it grows or trims: a step's freed blocks stay mapped.
# 256 MiB removed the faults of the embedded model's step; 32 to 128 MiB left half of them or more.
TOP_PAD_BYTES = 256 << 20
# Whether this process runs with the settings (read by daemon.training.speed.autotune: a measured choice depends on it).
kept = False


def keep_freed_memory() -> bool:
    """Make glibc malloc keep the memory a training step frees, so the next step reuses it unfaulted.

    Sets ``M_MMAP_THRESHOLD`` to :data:`MMAP_THRESHOLD_BYTES` and ``M_TOP_PAD`` to
    :data:`TOP_PAD_BYTES` (``mallopt(3)``). Either alone is slower than the defaults: setting
    one turns off glibc's dynamic threshold, which leaves every block over 128 KiB to ``mmap``.
    With those two, a block over the threshold still got its own ``mmap`` where the heap's top
    could not hold it (a block over the top pad: SmolLM2's logits), and the top was trimmed to the
    pad when such a block was freed; so ``M_MMAP_MAX`` is 0 (every block from the heap, or from
    ``mmap`` only where glibc cannot grow a heap) and ``M_TRIM_THRESHOLD`` is -1 (never trimmed,
    as ``mallopt(3)`` documents): the process keeps the memory of its largest step until it exits
    (the daemon's training process lives for one file).
    Call it first in the process, before torch is imported: set after the imports, the same two
    values removed a third of the faults, not five sixths (the heap's state is by then glibc's
    default one). The resident memory stays near the in-use memory's peak: freed memory is reused, not returned.

    A malloc setting of the user's own wins: with a ``MALLOC_*`` variable or a ``glibc.malloc``
    tunable in ``GLIBC_TUNABLES`` in the environment, nothing is changed (``bench/end_to_end.py``
    measures glibc's defaults with ``GLIBC_TUNABLES=glibc.malloc.perturb=0``, which is the default).

    Returns:
        True where it was set, False where glibc is not the C library (musl, macOS, Windows)
        or the environment has a malloc setting: nothing changes then.
    """
    global kept
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or user_malloc_settings(os.environ):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        (M_TOP_PAD, TOP_PAD_BYTES),
        (M_MMAP_MAX, 0),
        (M_TRIM_THRESHOLD, -1),
    )
    kept = all(libc.mallopt(param, value) == 1 for param, value in settings)
    if not kept:
        logger.warning("glibc mallopt refused the training allocator's settings; the defaults stay")
    return kept


def user_malloc_settings(environ: dict[str, str] | os._Environ[str]) -> bool:
    """Whether ``environ`` configures glibc malloc itself (``MALLOC_*`` or a ``glibc.malloc`` tunable)."""
    return any(key.startswith("MALLOC_") for key in environ) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")
