"""The daemon under faults: kills at random moments, hostile and bad input, hangs, SIGTERM, torchrun, a full disk.

Each test runs real daemon processes on a tiny model; together they take a few minutes. A few
check one piece of the training child's path directly, where a real run would only add time.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import REPO as REPO_ROOT
from helpers import (
    SHAPES,
    Tree,
    daemon_argv,
    fill_disk,
    read_status,
    run_cli,
    shape_rows,
    small_disk,
    start_daemon,
    stdlib_documents,
    train,
    wait_for,
    write_jsonl,
)

from daemon.store.checkpoints import latest_complete_checkpoint
from daemon.store.ledger import Ledger
from daemon.store.status import history_violations
from daemon.training.snapshots import GenerationSettings, write_snapshot
from daemon.views.summary import format_summary


def _drop(tree: Tree, name: str, rows: list[object]) -> None:
    """Write elsewhere in the inbox under an ignored name, then rename in (atomic)."""
    part = write_jsonl(tree.inbox / f".{name}.part", rows)
    part.rename(tree.inbox / name)


def _drain(tree: Tree, *extra: str, timeout: float = 240, **overrides: object):
    result = run_cli(daemon_argv(tree, "--once", *extra, **overrides), cwd=tree.root, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _done_rows(tree: Tree) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in tree.history():
        if row["outcome"] == "done":
            rows.setdefault(row["file"], []).append(row)
    return rows


def _no_process_left_in(tree: Tree) -> bool:
    """True once nothing runs in the tree's folder.

    A killed daemon's training process kills itself within 0.5 s of its start-up imports, its
    prestarted one exits when its input ends, its report process when the page is written.
    """
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid != os.getpid() and process.cwd() == str(tree.root):
                return False
    return True


def _assert_each_file_done_once_and_the_steps_add_up(tree: Tree, files: dict[str, list]) -> None:
    """Every file in ``done/``, trained exactly once; the latest checkpoint's step is the sum of the planned steps."""
    assert sorted(p.name for p in (tree.inbox / "done").iterdir()) == sorted(files)
    assert list((tree.inbox / "failed").iterdir()) == []
    assert list((tree.inbox / "processing").iterdir()) == []
    assert [p.name for p in tree.inbox.iterdir() if p.name not in ("done", "failed", "processing")] == []
    done = _done_rows(tree)
    assert {name: len(rows) for name, rows in done.items()} == dict.fromkeys(files, 1)  # trained exactly once
    rows = [r for r in tree.history() if r["outcome"] == "done"]
    assert history_violations(rows) == []
    checkpoint = latest_complete_checkpoint(tree.output, set_aside=False)
    assert checkpoint is not None and checkpoint.global_step == sum(r["planned_steps"] for r in rows)
    assert {e.name for e in Ledger(tree.status).entries("done")} == set(files)
    assert sum(r["replayed_examples"] for r in rows) > 0  # replay (on by default) was in the steps


# About 2 minutes beside another test; it took 250 s when the test processes oversubscribed the cores.
@pytest.mark.timeout(600)
def test_sigkill_at_random_moments_never_loses_or_repeats_a_file(tree):
    rng = random.Random(20261122)
    docs = stdlib_documents(limit=64)
    shapes = (*SHAPES, "text")
    files = {f"file{i}.jsonl": shape_rows(shape, docs[i * 16 : (i + 1) * 16]) for i, shape in enumerate(shapes)}
    # Long enough per file (a few hundred steps, a checkpoint every 5) for kills to land mid-file.
    flags = {"save_steps": 5, "num_train_epochs": 6}

    def slow_writer() -> None:  # one file written in place, in two halves, while the daemon runs
        rows = [json.dumps(r) + "\n" for r in files["file3.jsonl"]]
        with open(tree.inbox / "file3.jsonl", "w") as f:
            f.writelines(rows[:8])
            f.flush()
            time.sleep(0.4)
            f.writelines(rows[8:])

    writer = threading.Thread(target=slow_writer)
    kills = 0
    for round_ in range(5):
        daemon = start_daemon(tree, **flags)
        if round_ == 0:
            _drop(tree, "file0.jsonl", files["file0.jsonl"])
            _drop(tree, "file1.jsonl", files["file1.jsonl"])
        if round_ == 1:
            writer.start()
        if round_ == 2:
            _drop(tree, "file2.jsonl", files["file2.jsonl"])
        time.sleep(rng.uniform(6.0, 20.0))  # start-up (flag check, child imports) alone takes ~9 s here
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()
        kills += 1
    writer.join()
    assert kills == 5
    wait_for(lambda: _no_process_left_in(tree), 60, "the killed daemon's processes to end")
    _drain(tree, **flags)
    _assert_each_file_done_once_and_the_steps_add_up(tree, files)


_WORKING = ("loading", "tokenizing", "training", "evaluating", "saving")


def _working_or_done(tree: Tree, stale_pid: object, arrived: list[str]) -> bool:
    """A training process of this round reports work, or every file that arrived is done (nothing left to do)."""
    status = read_status(tree)
    if status.get("state") in _WORKING and status.get("pid") != stale_pid:
        return True
    return {p.name for p in (tree.inbox / "done").glob("*.jsonl")} >= set(arrived)


@pytest.mark.slow  # twenty restarts of the daemon: 5 to 10 minutes; the test above is the short version
@pytest.mark.timeout(1500)
def test_twenty_sigkills_at_random_moments_over_a_mixed_queue_with_replay_stay_exact(tree):
    rng = random.Random(20261204)
    docs = stdlib_documents(limit=144, chars=300)
    files = {  # text, prompt-completion and chat files in turn, one more arriving in each of the first 9 rounds
        f"file{i}-{shape}.jsonl": shape_rows(shape, docs[i * 16 : (i + 1) * 16]) for i, shape in enumerate(SHAPES * 3)
    }
    flags = {"save_steps": 5, "num_train_epochs": 6}
    arrivals, mid_work = list(files), 0
    for round_ in range(20):
        stale_pid = read_status(tree).get("pid")  # the last writer of the status: a process killed before
        daemon = start_daemon(tree, **flags)
        if round_ < len(arrivals):
            _drop(tree, arrivals[round_], files[arrivals[round_]])
        if round_ % 4 == 0:  # a kill in the daemon's start-up (flag check, locks, recovery of the last kill)
            time.sleep(rng.uniform(0.5, 10.0))
        else:  # a kill in its training process's work: parse, train, checkpoint, evaluate, export, file away
            working = functools.partial(_working_or_done, tree, stale_pid, arrivals[: round_ + 1])
            wait_for(working, 180, "the training process to work")
            time.sleep(rng.uniform(0.0, 6.0))
        status = read_status(tree)
        mid_work += status.get("state") in _WORKING and status.get("pid") != stale_pid
        os.killpg(daemon.pid, signal.SIGKILL)  # the next daemon starts at once, beside what this one started
        daemon.wait()
    assert mid_work >= 8  # the premise: kills landed in the work, not only in start-ups
    wait_for(lambda: _no_process_left_in(tree), 60, "the killed daemons' processes to end")
    _drain(tree, timeout=600, **flags)
    _assert_each_file_done_once_and_the_steps_add_up(tree, files)


def test_bad_and_hostile_entries_end_with_their_reason_and_the_daemon_trains_the_next_file(tree, tmp_path_factory):
    good = [{"text": d} for d in stdlib_documents(limit=8)]
    outside = tmp_path_factory.mktemp("outside") / "secret.jsonl"
    write_jsonl(outside, good)
    _drop(tree, "a-good.jsonl", good)
    (tree.inbox / "b-empty.jsonl").write_bytes(b"")
    (tree.inbox / "c-all-bad.jsonl").write_bytes(b"{nope\n[1]\n")
    (tree.inbox / "d-binary.jsonl").write_bytes(bytes(range(256)) * 4)
    (tree.inbox / "e-latin1.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    (tree.inbox / "f-symlink.jsonl").symlink_to(outside)
    os.mkfifo(tree.inbox / "g-fifo.jsonl")
    (tree.inbox / "h-directory").mkdir()
    write_jsonl(tree.root / "elsewhere.jsonl", good[:4])
    os.link(tree.root / "elsewhere.jsonl", tree.inbox / "h2-hardlink.jsonl")
    _drop(tree, "i-duplicate.jsonl", good)
    _drop(tree, "j-next-good.jsonl", [{"text": d} for d in stdlib_documents(limit=16)[8:]])
    for i, path in enumerate(sorted(tree.inbox.iterdir())):
        if path.name not in ("done", "failed", "processing"):
            os.utime(path, (1000 + i, 1000 + i), follow_symlinks=False)

    _drain(tree)

    expected = {
        "b-empty.jsonl": "empty",
        "c-all-bad.jsonl": "no usable examples",
        "d-binary.jsonl": "binary",
        "e-latin1.jsonl": "invalid UTF-8",
        "f-symlink.jsonl": "symbolic link",
        "g-fifo.jsonl": "FIFO",
        "h-directory": "directory",
        "h2-hardlink.jsonl": "hard link",
        "i-duplicate.jsonl": "skipped: same content",
    }
    failed = tree.inbox / "failed"
    for name, reason in expected.items():
        assert os.path.lexists(failed / name), name
        assert reason in (failed / f"{name}.error.txt").read_text(), name
    assert sorted(p.name for p in (tree.inbox / "done").iterdir()) == ["a-good.jsonl", "j-next-good.jsonl"]
    assert outside.read_text() == "".join(json.dumps(r) + "\n" for r in good)  # the target was never touched
    assert history_violations(tree.history()) == []
    states = {e.name: e.state for e in Ledger(tree.status).entries()}
    assert states["f-symlink.jsonl"] == "rejected" and states["i-duplicate.jsonl"] == "duplicate"
    assert states["j-next-good.jsonl"] == "done"


def test_a_snapshot_of_a_file_named_to_the_limit_fits_the_file_system(tree):
    name = "é" * 124 + ".jsonl"  # 254 bytes: a legal name, too long once the step is put before it
    settings = GenerationSettings(max_new_tokens=4, temperature=0.8, top_k=50, seed=0)
    samples = [{"prompt": "def ", "completion": "f(x):"}]
    folder = write_snapshot(tree.status, 12, name, 1.5, 4, settings, samples)
    assert folder.parent == tree.status / "evolution" and folder.name.startswith("00000012-" + "é" * 100)
    assert len(os.fsencode(folder.name)) <= 250  # room for the temporary name it is written under
    assert json.loads((folder / "snapshot.json").read_text(encoding="utf-8"))["file"] == name
    assert write_snapshot(tree.status, 12, name, 1.4, 4, settings, samples) == folder  # rewritten in place


def test_a_snapshot_of_a_file_whose_name_is_not_utf8_or_holds_a_newline_is_written_escaped(tree):
    settings = GenerationSettings(max_new_tokens=4, temperature=0.8, top_k=50, seed=0)
    for name, shown in [
        (os.fsdecode(b"caf\xe9.jsonl"), "caf\\xe9.jsonl"),
        ("a\n# forged.jsonl", "a\\x0a# forged.jsonl"),
    ]:
        folder = write_snapshot(tree.status, 3, name, 1.5, 4, settings, [])
        assert json.loads((folder / "snapshot.json").read_text(encoding="utf-8"))["file"] == shown
        assert (folder / "samples.md").read_text(encoding="utf-8").splitlines()[0] == f"# Step 3: after `{shown}`"


def _launcher(prefix: str, patch: str) -> str:
    """A ``--launcher`` script: ``python -m daemon ...`` as given, after ``patch`` for a dataset named ``prefix*``."""
    return f"""
import os, runpy, sys, threading
args = sys.argv[1:]
dataset = os.path.basename(args[args.index("--dataset") + 1])
if dataset.startswith({prefix!r}):
{textwrap.indent(textwrap.dedent(patch).strip(), "    ")}
assert args[:2] == ["-m", "daemon"]
sys.argv = ["daemon", *args[2:]]
runpy.run_module("daemon", run_name="__main__")
"""


# Blocks forever in the data collator, as a stuck input pipeline would.
HANG_LAUNCHER = _launcher(
    "1-hang",
    """
    import daemon.training.data
    daemon.training.data.PaddingCollator.__call__ = lambda self, features: threading.Event().wait()
    """,
)


def test_a_hanging_child_is_killed_retried_then_failed_and_the_next_file_trains(tree):
    launcher = tree.root / "hang_launcher.py"
    launcher.write_text(HANG_LAUNCHER)
    _drop(tree, "1-hang.jsonl", [{"text": d} for d in stdlib_documents(limit=8)])
    _drop(tree, "2-good.jsonl", [{"text": d} for d in stdlib_documents(limit=16)[8:]])
    os.utime(tree.inbox / "1-hang.jsonl", (1000, 1000))
    result = _drain(
        tree,
        "--launcher",
        f"{sys.executable} {launcher}",
        # Above a loaded machine's process start-up (imports ~5 s, beside the report process the daemon
        # starts after each file): only the hanging file may look stalled.
        "--stall_timeout",
        "12",
        "--max_attempts",
        "2",
        timeout=280,
    )
    assert "no training progress for 12 s" in result.stderr
    error = (tree.inbox / "failed" / "1-hang.jsonl.error.txt").read_text()
    assert "stalled" in error and "gave up after 2 attempts" in error
    assert (tree.inbox / "done" / "2-good.jsonl").exists()
    entry = next(e for e in Ledger(tree.status).entries() if e.name == "1-hang.jsonl")
    assert (entry.state, entry.attempts) == ("failed", 2)
    assert history_violations(tree.history()) == []


# A bug in tokenization, the same on every attempt.
RAISE_LAUNCHER = _launcher(
    "1-raise",
    """
    import daemon.training.prepare
    def broken(*args, **kwargs):
        raise RuntimeError("the tokenizer exploded on purpose\\nwith a second line nobody needs")
    daemon.training.prepare.prepare_datasets = broken
    """,
)


def test_a_child_that_raises_fails_its_file_with_the_exceptions_reason_without_a_third_attempt(tree):
    launcher = tree.root / "raise_launcher.py"
    launcher.write_text(RAISE_LAUNCHER)
    _drop(tree, "1-raise.jsonl", [{"text": d} for d in stdlib_documents(limit=8)])
    os.utime(tree.inbox / "1-raise.jsonl", (1000, 1000))
    result = _drain(tree, "--launcher", f"{sys.executable} {launcher}", "--max_attempts", "3")
    reason = "RuntimeError: the tokenizer exploded on purpose"
    assert result.stderr.count("Traceback") == 2  # the bug's traceback stays in the daemon's log, once an attempt
    error = (tree.inbox / "failed" / "1-raise.jsonl.error.txt").read_text()
    assert reason in error and "second line" not in error
    assert reason in read_status(tree)["last_error"]["message"]
    (entry,) = Ledger(tree.status).entries()
    assert (entry.state, entry.attempts) == ("failed", 2) and reason in (entry.error or "")
    (row,) = tree.history()
    assert row["outcome"] == "failed" and reason in row["error"]


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``error:`` line a refused run printed; it exited 1 without a traceback."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


def _untouched(tree: Tree) -> None:
    """Nothing was claimed, filed away or trained."""
    assert (tree.inbox / "a.jsonl").exists()
    assert [p.name for p in tree.inbox.rglob("*") if p.is_file()] == ["a.jsonl"]
    assert latest_complete_checkpoint(tree.output, set_aside=False) is None


def test_a_damaged_ledger_refuses_the_daemon_train_py_and_rollback_with_one_line_and_moves_nothing(tree):
    _drop(tree, "a.jsonl", [{"text": d} for d in stdlib_documents(limit=8)])
    (tree.status / "ledger.sqlite").write_bytes(bytes(range(256)) * 16)
    daemon = run_cli(daemon_argv(tree, "--once"), cwd=tree.root, timeout=120)
    train_py = run_cli(
        [str(REPO_ROOT / "train.py"), "--dataset", str(tree.inbox / "a.jsonl"), *tree.flags()], cwd=tree.root
    )
    rollback = run_cli(["-m", "daemon", "rollback", "--list", "--status_dir", str(tree.status)], cwd=tree.root)
    for result in (daemon, train_py, rollback):
        line = _one_error_line(result)
        assert str(tree.status / "ledger.sqlite") in line and "damaged" in line and "rebuild-ledger" in line, line
    _untouched(tree)


def _read_only(folder: Path) -> list[str]:
    """Make ``folder`` read-only for the commands run behind the returned prefix.

    As a user, ``chmod``; as root, which ignores file modes, a read-only bind mount in a mount
    namespace of the command's own (``unshare``), which ends with it; skipped where neither works.
    """
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    prefix = ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"']
    prefix.append(str(folder))
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"running as root without a private read-only mount ({probe.stderr.strip()})")
    return prefix


def test_a_read_only_status_folder_refuses_the_daemon_and_train_py_with_one_line_and_moves_nothing(tree):
    _drop(tree, "a.jsonl", [{"text": d} for d in stdlib_documents(limit=8)])
    prefix = _read_only(tree.status)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        results = [
            subprocess.run([*prefix, sys.executable, *argv], cwd=tree.root, env=env, capture_output=True, text=True)
            for argv in (
                daemon_argv(tree, "--once"),
                [str(REPO_ROOT / "train.py"), "--dataset", str(tree.inbox / "a.jsonl"), *tree.flags()],
            )
        ]
    finally:
        tree.status.chmod(0o755)
    for result in results:
        line = _one_error_line(result)
        assert str(tree.status) in line and ("read-only" in line or "not writable" in line), line
    _untouched(tree)
    assert list(tree.status.iterdir()) == []


def test_sigterm_mid_file_checkpoints_exits_and_the_restart_finishes_the_file(tree):
    flags = {"num_train_epochs": 30, "save_steps": 1000}
    _drop(tree, "long.jsonl", [{"text": d} for d in stdlib_documents(limit=12)])
    daemon = start_daemon(tree, **flags)
    status = wait_for(
        lambda: (
            (s := read_status(tree)).get("state") == "training"
            and (s.get("current_file") or {}).get("steps_done", 0) >= 3
            and s
        ),
        timeout=120,
        what="training to be under way",
    )
    planned = status["current_file"]["planned_steps"]
    _drop(tree, "next.jsonl", [{"text": d} for d in stdlib_documents(limit=16)[12:]])
    wait_for(
        lambda: (s := read_status(tree)).get("queue") == ["next.jsonl"] and s["state"] == "training",
        timeout=30,
        what="a file dropped during training to show in the queue",
    )
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=60) == 0
    stopped = read_status(tree)
    assert stopped["state"] == "stopped"
    checkpoint = latest_complete_checkpoint(tree.output, set_aside=False)
    assert checkpoint is not None and 3 <= checkpoint.global_step < planned  # saved mid-file on the signal
    assert (tree.inbox / "processing" / "long.jsonl").exists()

    _drain(tree, **flags)
    row, next_row = tree.history()  # the interrupted file first: claimed files go before the queue
    assert (row["outcome"], row["start_step"], row["end_step"], row["planned_steps"]) == ("done", 0, planned, planned)
    assert next_row["file"] == "next.jsonl" and next_row["start_step"] == planned
    assert sorted(p.name for p in (tree.inbox / "done").iterdir()) == ["long.jsonl", "next.jsonl"]


def test_a_second_daemon_exits_and_a_killed_daemons_lock_is_recovered(tree):
    first = start_daemon(tree)
    wait_for(lambda: read_status(tree).get("state") == "idle", timeout=60, what="the first daemon to start")
    second = run_cli(daemon_argv(tree, "--once"), cwd=tree.root, timeout=60)
    assert second.returncode == 1 and "another daemon is already training" in second.stderr
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    _drop(tree, "a.jsonl", [{"text": d} for d in stdlib_documents(limit=8)])
    _drain(tree)  # the lock of the killed daemon does not block it
    assert (tree.inbox / "done" / "a.jsonl").exists()


def test_a_second_daemon_on_the_same_inbox_or_status_folder_exits_naming_it(tree):
    first = start_daemon(tree, "--prestart", "False")
    try:
        wait_for(lambda: read_status(tree).get("state") == "idle", timeout=60, what="the first daemon to start")
        other = tree.root / "other"
        same_inbox = daemon_argv(tree, "--once", output_dir=other / "model", status_dir=other / "status")
        same_status = daemon_argv(tree, "--once", "--inbox_dir", str(other / "inbox"), output_dir=other / "model")
        for argv, folder in ((same_inbox, tree.inbox), (same_status, tree.status)):
            result = run_cli(argv, cwd=tree.root, timeout=60)
            assert result.returncode == 1, result.stderr
            (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
            assert "another daemon is already " in line and str(folder) in line, line
        assert [p.name for p in other.rglob("*") if p.is_file() and p.name != ".daemon.lock"] == []
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0


HANG_IN = r"""
import sys, threading
from pathlib import Path
import datasets
phase, marker, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]

def hang():
    marker.touch()
    threading.Event().wait()  # until SIGKILL

if phase == "generation":  # mid Dataset.from_generator: the parse of the file into Arrow
    from_generator = datasets.Dataset.from_generator
    def hanging_from_generator(generator, *args, **kwargs):
        def records(**gen_kwargs):
            for i, record in enumerate(generator(**gen_kwargs)):
                if i == 8:
                    hang()
                yield record
        return from_generator(records, *args, **kwargs)
    datasets.Dataset.from_generator = hanging_from_generator
else:  # mid Dataset.map: tokenization, its third batch
    map_ = datasets.Dataset.map
    def hanging_map(self, function, *args, **kwargs):
        calls = []
        def batch(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                hang()
            return function(*a, **k)
        return map_(self, batch, *args, **kwargs)
    datasets.Dataset.map = hanging_map
from daemon.training.cli import main
sys.exit(main(argv))
"""


def _leftovers(cache: Path) -> list[str]:
    return sorted(
        str(p.relative_to(cache))
        for p in cache.rglob("*")
        if p.name.startswith("tmp") or p.name.endswith(".incomplete")
    )


def test_runs_killed_mid_parse_or_mid_tokenization_leave_no_temporary_files_once_the_next_run_starts(tree):
    script = tree.root / "hang_in.py"
    script.write_text(HANG_IN)
    docs = stdlib_documents(limit=48)
    first = write_jsonl(tree.root / "first.jsonl", [{"text": d} for d in docs[:24]])
    second = write_jsonl(tree.root / "second.jsonl", [{"text": d} for d in docs[24:]])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for phase, data, left in (("generation", first, ".incomplete"), ("map", second, "/tmp")):
        marker = tree.root / f"hanging-{phase}"
        argv = [sys.executable, str(script), phase, str(marker), "--dataset", str(data)]
        child = subprocess.Popen(
            [*argv, *tree.flags(preprocessing_batch_size=4)], cwd=tree.root, env=env, stderr=subprocess.DEVNULL
        )
        try:
            wait_for(marker.exists, timeout=120, what=f"the run to hang mid-{phase}")
        finally:
            child.kill()
            child.wait()
        assert any(left in path for path in _leftovers(tree.cache)), _leftovers(tree.cache)  # what datasets leaves
    result = run_cli(
        [str(REPO_ROOT / "train.py"), "--dataset", str(second), *tree.flags(preprocessing_batch_size=4)], cwd=tree.root
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _leftovers(tree.cache) == []


def test_a_file_trains_under_torchrun_with_two_cpu_processes(tree):
    rows = [{"text": d} for d in stdlib_documents(limit=24)]
    _drop(tree, "ddp.jsonl", rows)
    launcher = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2"
    _drain(tree, "--launcher", launcher, timeout=280)
    (row,) = tree.history()
    assert row["outcome"] == "done"
    # world size 2 in the effective batch: 4 per device x 1 accumulation x 2 processes
    assert row["planned_steps"] == -(-row["examples"] // 8)
    assert row["end_step"] - row["start_step"] == row["planned_steps"]
    checkpoint = latest_complete_checkpoint(tree.output, set_aside=False)
    assert checkpoint is not None and checkpoint.global_step == row["end_step"]
    assert (tree.inbox / "done" / "ddp.jsonl").exists()
    assert Path(tree.output / "config.json").exists()


def _spares_of(pid: int) -> list[int]:
    """Pids of the prestarted training processes (``python -m daemon train-spare``) that ``pid`` started."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    spares = []
    for child in children:
        try:
            if b"train-spare" in Path(f"/proc/{child}/cmdline").read_bytes():
                spares.append(int(child))
        except OSError:
            continue
    return spares


def test_an_idle_daemon_prestarts_the_training_process_and_trains_the_next_file_in_it(tree):
    daemon = start_daemon(tree)
    try:
        (spare,) = wait_for(lambda: _spares_of(daemon.pid), timeout=60, what="a prestarted training process")
        time.sleep(1)
        assert _spares_of(daemon.pid) == [spare]  # one at a time
        _drop(tree, "a.jsonl", [{"text": d} for d in stdlib_documents(limit=12)])
        wait_for(lambda: tree.history(), timeout=120, what="the file to be trained")
        assert tree.history()[0]["outcome"] == "done"
        assert f"training in the prestarted process {spare}" in (tree.root / "daemon.log").read_text()
        (following,) = wait_for(
            lambda: [p for p in _spares_of(daemon.pid) if p != spare], timeout=60, what="the next prestarted process"
        )
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    assert not Path(f"/proc/{following}").exists()  # the daemon does not leave it behind


def test_without_prestart_no_process_waits(tree):
    daemon = start_daemon(tree, "--prestart", "False")
    try:
        wait_for(lambda: read_status(tree).get("state") == "idle", timeout=60, what="the daemon to start")
        time.sleep(2)
        assert _spares_of(daemon.pid) == []
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0


def test_a_full_disk_makes_the_daemon_wait_with_the_file_claimed_and_resume_once_space_is_freed(tree):
    with small_disk(tree.output, 4096):
        a = train(tree, write_jsonl(tree.root / "a.jsonl", [{"text": d} for d in stdlib_documents(limit=8)]))
        filler = fill_disk(tree.output, leave=200_000)
        _drop(tree, "b.jsonl", [{"text": d} for d in stdlib_documents(limit=20)[8:]])
        daemon = start_daemon(tree, "--once")
        try:
            status = wait_for(
                lambda: (s := read_status(tree)).get("state") == "waiting_for_disk" and s,
                timeout=180,
                what="the daemon to wait for disk space",
            )
            assert status["disk"]["needed_bytes"] > status["disk"]["free_bytes"]
            assert f"bytes needed in {tree.output}" in format_summary(status)
            assert (tree.inbox / "processing" / "b.jsonl").exists()  # still claimed
            time.sleep(1)  # it keeps waiting: no retry, no attempt counted
            assert read_status(tree)["state"] == "waiting_for_disk"
            filler.unlink()
            assert daemon.wait(timeout=180) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
        (b,) = [e for e in Ledger(tree.status).entries() if e.name == "b.jsonl"]
        assert (b.state, b.attempts, b.start_step) == ("done", 0, a["end_step"])
        assert b.end_step == a["end_step"] + b.planned_steps
        latest = latest_complete_checkpoint(tree.output, set_aside=False)
        assert latest is not None and latest.global_step == b.end_step
        assert [p.name for p in tree.output.iterdir() if p.name.startswith(("torn-", ".export"))] == []
    assert history_violations(tree.history()) == []
    assert read_status(tree)["disk"] is None
    log = (tree.root / "daemon.log").read_text()
    assert f"no space left in {tree.output}" in log and "resuming" in log
