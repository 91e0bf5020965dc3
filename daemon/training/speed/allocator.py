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

The memory a process touches first is still faulted in once, a 4 KiB page at a time: the first
training step of SmolLM2 (activations, gradients, AdamW's state: gigabytes) and the evaluation
and generation before it. :func:`use_huge_pages` has PyTorch's CPU allocator ask the kernel for
2 MiB transparent huge pages for its blocks of 2 MiB or more (``THP_MEM_ALLOC_ENABLE``, read by
``c10/core/impl/alloc_cpu.cpp``), 512 times fewer faults for them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
from pathlib import Path

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
steps_kept = False  # keep_step_memory's settings


def keep_freed_memory() -> bool:
    """Make glibc malloc keep the memory a training step frees, so the next step reuses it unfaulted.

    Sets ``M_MMAP_THRESHOLD`` to :data:`MMAP_THRESHOLD_BYTES` and ``M_TOP_PAD`` to
    :data:`TOP_PAD_BYTES` (``mallopt(3)``). Either alone is slower than the defaults: setting
    one turns off glibc's dynamic threshold, which leaves every block over 128 KiB to ``mmap``.
    A block the heap's top cannot hold still gets its own ``mmap``: :func:`keep_step_memory`
    keeps those too, from the first training step on.
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
    kept = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and libc.mallopt(M_TOP_PAD, TOP_PAD_BYTES) == 1
    if not kept:
        logger.warning("glibc mallopt refused the training allocator's settings; the defaults stay")
    return kept


def keep_step_memory() -> bool:
    """From here on, serve every block from the heap and never trim it; call once training starts.

    With :func:`keep_freed_memory`'s settings, a block larger than the heap's free top still gets
    its own ``mmap`` whatever the threshold, and is unmapped when freed; the top is trimmed back to
    the pad after it. SmolLM2-135M's fp32 logits of a micro-batch (8 x 256 x 49,152 x 4 bytes = 384
    MiB, several such blocks a step) were faulted in again at every step: 460,000 to 900,000 faults
    a step, about 40 % of it in the kernel (BENCHMARKS.md, "real-model speed"). ``M_MMAP_MAX`` 0
    (every block from the heap; glibc still maps memory where it cannot grow a heap) and
    ``M_TRIM_THRESHOLD`` -1 (never trimmed, as ``mallopt(3)`` documents) keep them: the process
    holds the memory of its largest step until it exits (the daemon's training process lives for
    one file). Not set before training: the data pipeline's peaks (a one-line document of 100 MB
    took 1.4 GB to tokenize) would stay held through training (1.7 GB at the first step, against 0.8).

    Returns:
        True where set: only after :func:`keep_freed_memory` set its own (else nothing changes).
    """
    global steps_kept
    if not kept or steps_kept:
        return steps_kept
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    steps_kept = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
    if not steps_kept:
        logger.warning("glibc mallopt refused the training steps' allocator settings; the heap may still trim")
    return steps_kept


THP_ENV = "THP_MEM_ALLOC_ENABLE"  # PyTorch's switch: its CPU blocks of >= 2 MiB madvise(MADV_HUGEPAGE)
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"  # "always [madvise] never": the bracket is the mode


def use_huge_pages(mode_file: str = THP_MODE) -> bool:
    """Have PyTorch back its CPU tensors of 2 MiB or more with transparent huge pages; call before torch is imported.

    Sets ``THP_MEM_ALLOC_ENABLE=1`` in this process's environment (PyTorch reads it when its
    library loads) where the kernel's THP mode (``mode_file``) is ``always`` or ``madvise``: each
    such block is then 2 MiB-aligned and advised ``MADV_HUGEPAGE`` (Linux's
    ``Documentation/admin-guide/mm/transhuge.rst``), so touching it faults 2 MiB at a time: a
    training process of SmolLM2-135M took 0.5 million faults instead of 2.2 million (BENCHMARKS.md,
    "real-model speed emulated-avx2"). Blocks under 2 MiB are left as they are.

    The variable already in the environment (``0`` too) wins: nothing is changed.

    Returns:
        True where it was set; False on another OS, with THP ``never`` or unreadable, or a value the user gave.
    """
    if platform.system() != "Linux" or THP_ENV in os.environ:
        return False
    try:
        mode = Path(mode_file).read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    if "[always]" not in mode and "[madvise]" not in mode:
        return False
    os.environ[THP_ENV] = "1"
    return True


def user_malloc_settings(environ: dict[str, str] | os._Environ[str]) -> bool:
    """Whether ``environ`` configures glibc malloc itself (``MALLOC_*`` or a ``glibc.malloc`` tunable)."""
    return any(key.startswith("MALLOC_") for key in environ) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")
