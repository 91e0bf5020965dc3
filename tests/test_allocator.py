"""The training process's glibc malloc settings: freed memory stays mapped, a user's own settings win."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from daemon.training.speed.allocator import user_malloc_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A step's small blocks grow the heap first (a 1 MiB one here); then allocate, touch and free a
# block of argv[2] MiB (48: over glibc's largest mmap threshold; 320: over the heap's top pad too,
# as SmolLM2's logits) five times, the way a training step allocates and frees its logits, and
# count the minor page faults of the last four rounds.
_PROBE = """
import ctypes, json, resource, sys
from daemon.training.speed.allocator import keep_freed_memory
from daemon.training.speed.allocator import keep_step_memory
kept = keep_freed_memory() if sys.argv[1] in ("keep", "steps") else False
if sys.argv[1] == "steps":
    kept = keep_step_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(1 << 20))
size = int(sys.argv[2]) << 20
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": sum(faults[1:])}))
"""


def _probe(mode: str, mib: int = 48, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not user_malloc_settings({k: v})}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, mode, str(mib)],
        env={**clean, "PYTHONPATH": REPO, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_blocks_stay_mapped_unless_the_user_set_malloc_up():
    pages = (48 << 20) // 4096
    default = _probe("default")
    assert not default["kept"] and default["faults"] >= 4 * pages * 0.9  # glibc's default: unmapped, faulted again
    kept = _probe("keep")
    assert kept["kept"] and kept["faults"] < pages // 10  # reused from the heap: no new pages
    theirs = _probe("keep", GLIBC_TUNABLES="glibc.malloc.perturb=0")
    assert not theirs["kept"] and theirs["faults"] >= 4 * pages * 0.9


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_block_larger_than_the_heaps_top_pad_stays_mapped_once_training_starts():
    pages = (320 << 20) // 4096
    assert _probe("default", 320)["faults"] >= 4 * pages * 0.9
    before_steps = _probe("keep", 320)  # the data pipeline's settings: such a block is its own mmap
    assert before_steps["kept"] and before_steps["faults"] >= 4 * pages * 0.9
    steps = _probe("steps", 320)
    assert steps["kept"] and steps["faults"] < pages // 10
    assert _probe("steps", 320, GLIBC_TUNABLES="glibc.malloc.perturb=0")["kept"] is False  # theirs win


def test_a_users_malloc_settings_are_recognised():
    assert user_malloc_settings({"MALLOC_ARENA_MAX": "2"})
    assert user_malloc_settings({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512:glibc.malloc.tcache_count=0"})
    assert not user_malloc_settings({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512", "PATH": "/bin"})
    assert not user_malloc_settings({})


def test_the_training_entry_points_set_malloc_up_before_training(monkeypatch):
    import daemon.__main__ as entry
    from daemon.training import cli
    from daemon.training.speed import allocator

    calls: list[str] = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("malloc") or True)
    monkeypatch.setattr(allocator, "use_huge_pages", lambda: calls.append("thp") or True)
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(f"train {argv}") or 0)
    monkeypatch.setattr(cli, "train_spare_main", lambda argv: calls.append("spare") or 0)
    monkeypatch.setattr(cli, "check_args_main", lambda argv: calls.append("check") or 0)
    assert entry.main(["train", "--dataset", "a.jsonl"]) == 0
    assert entry.main(["train-spare"]) == 0
    assert entry.main(["check-args"]) == 0
    assert calls == ["malloc", "thp", "train ['--dataset', 'a.jsonl']", "malloc", "thp", "spare", "check"]


@pytest.mark.parametrize(
    ("mode", "given", "expected"),
    [
        ("always [madvise] never\n", None, "1"),
        ("[always] madvise never\n", None, "1"),
        ("always madvise [never]\n", None, None),  # the kernel gives none: nothing to ask for
        ("always [madvise] never\n", "0", "0"),  # the user's own value wins
        (None, None, None),  # no THP in this kernel
    ],
)
def test_huge_pages_are_asked_of_pytorch_where_the_kernel_gives_them_and_the_user_said_nothing(
    tmp_path, monkeypatch, mode, given, expected
):
    from daemon.training.speed.allocator import THP_ENV, use_huge_pages

    monkeypatch.setattr(platform, "system", lambda: "Linux")
    mode_file = tmp_path / "enabled"
    if mode is not None:
        mode_file.write_text(mode)
    if given is None:
        monkeypatch.delenv(THP_ENV, raising=False)
    else:
        monkeypatch.setenv(THP_ENV, given)
    assert use_huge_pages(str(mode_file)) is (expected == "1" and given is None)
    assert os.environ.get(THP_ENV) == expected
