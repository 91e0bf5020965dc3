"""Multi-node launchers: two ``torchrun`` agents of one c10d rendezvous on loopback, standing in for two nodes.

The daemon stays one process on one node and puts ``--launcher`` in front of each file's child
(docs/distributed.md, "Multi-node"); here the launcher is tests/launchers/two_nodes.py, which starts
two agents (``--nnodes 2 --nproc_per_node 1 --rdzv-backend c10d``) and stops the survivor when one
fails, as ``srun --kill-on-bad-exit`` does on a cluster.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import psutil
import pytest
from helpers import REPO, Tree, daemon_argv, stdlib_documents, wait_for, write_jsonl

from daemon.store.checkpoints import latest_complete_checkpoint

TWO_NODES = REPO / "tests" / "launchers" / "two_nodes.py"
FAULTS = REPO / "tests" / "cpu_fsdp"  # its sitecustomize.py: the one-time SIGKILL of a rank (CPU_FSDP_KILL)


def _launcher() -> str:
    return f"{sys.executable} {TWO_NODES}"


def _drop(tree: Tree, name: str, docs: list[str]) -> None:
    part = write_jsonl(tree.inbox / f".{name}.part", [{"text": d} for d in docs])
    part.rename(tree.inbox / name)


def _drain(tree: Tree, timeout: float, *extra: str, env: dict[str, str] | None = None, **flags: object):
    argv = daemon_argv(tree, "--once", "--launcher", _launcher(), *extra, replay_fraction=0, **flags)
    run_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(
        [sys.executable, *argv], cwd=tree.root, env=run_env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _exported_step(tree: Tree) -> int:
    return json.loads((tree.output / "export.json").read_text())["global_step"]


@pytest.mark.timeout(600)  # about 45 s on 2 idle cores; minutes on a loaded machine
def test_two_agents_of_one_c10d_rendezvous_train_a_file_end_to_end(tree):
    _drop(tree, "1-a.jsonl", stdlib_documents(limit=16))
    result = _drain(tree, 540, forward_transfer=False)
    (row,) = tree.history()
    assert row["outcome"] == "done"
    assert row["planned_steps"] == math.ceil(row["examples"] / 8)  # 4 per device x 1 accumulation x world size 2
    assert (row["start_step"], row["end_step"]) == (0, row["planned_steps"])
    assert latest_complete_checkpoint(tree.output, set_aside=False).global_step == row["end_step"]
    assert _exported_step(tree) == row["end_step"]
    assert (tree.inbox / "done" / "1-a.jsonl").exists()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tree.output, local_files_only=True).num_parameters() > 0
    assert "two_nodes: an agent exited" not in result.stderr


@pytest.mark.slow  # over a minute on 2 cores: two attempts, each starting two agents and two ranks
@pytest.mark.timeout(600)
def test_a_node_lost_mid_file_fails_the_attempt_and_the_retry_resumes_at_the_last_checkpoint(tree):
    _drop(tree, "1-a.jsonl", stdlib_documents(limit=16))
    marker = tree.root / "killed"
    # rank 1, the second agent's only rank, SIGKILLs itself at the end of step 12 (after checkpoint-10)
    env = {"PYTHONPATH": os.pathsep.join([str(FAULTS), str(REPO)]), "CPU_FSDP_KILL": f"12:1:{marker}"}
    result = _drain(tree, 540, env=env, save_steps=5, forward_transfer=False)
    assert marker.exists()
    assert "two_nodes: an agent exited with" in result.stderr  # the lost node failed the attempt ...
    assert "training 1-a.jsonl (attempt 2)" in result.stderr  # ... and the daemon ran the file again
    assert "resuming 1-a.jsonl at step 10 of its plan 0 -> " in result.stderr
    (row,) = tree.history()
    assert row["outcome"] == "done"
    assert row["planned_steps"] == math.ceil(row["examples"] / 8)
    assert (row["start_step"], row["end_step"]) == (0, row["planned_steps"])
    assert latest_complete_checkpoint(tree.output, set_aside=False).global_step == row["end_step"]
    assert _exported_step(tree) == row["end_step"]


@pytest.mark.slow  # two attempts of two agents each
@pytest.mark.timeout(600)
def test_a_rank_that_fails_setup_ends_the_attempt_and_its_reason_is_the_files_error(tree):
    # rank 1 raises before the ranks compare plans, where rank 0 waits for it: the attempt ends at
    # once (gloo sees the closed connection; the launcher stops the other agent), and rank 1's reason,
    # not rank 0's "Connection closed by peer", is the file's error, the same twice: not retried again.
    _drop(tree, "1-a.jsonl", stdlib_documents(limit=16))
    env = {"PYTHONPATH": os.pathsep.join([str(FAULTS), str(REPO)]), "CPU_FSDP_FAIL_SETUP": "1"}
    result = _drain(tree, 540, env=env, forward_transfer=False)
    (row,) = tree.history()
    assert row["outcome"] == "failed"
    assert row["error"].startswith("rank 1 cannot set up this file (injected) (training process exited with code")
    assert "training 1-a.jsonl (attempt 2)" in result.stderr
    assert "(attempt 3)" not in result.stderr
    error_file = tree.inbox / "failed" / "1-a.jsonl.error.txt"
    assert "rank 1 cannot set up this file (injected)" in error_file.read_text()


def test_the_first_rank_to_fail_leaves_the_attempts_reason(tmp_path, monkeypatch):
    from daemon.store.failures import FAILURE_FILE, FAILURE_FILE_ENV, leave_reason, take_reason

    path = tmp_path / FAILURE_FILE
    monkeypatch.setenv(FAILURE_FILE_ENV, str(path))
    leave_reason(ValueError("rank 1 failed first"))
    leave_reason(RuntimeError("Connection closed by peer [127.0.0.1]:1234"))  # another rank, because of it
    assert take_reason(path) == "ValueError: rank 1 failed first"
    assert list(tmp_path.iterdir()) == []  # taken, and no temporary file left
    leave_reason(RuntimeError("the next attempt"))  # the daemon took (removed) it: the next attempt's is written
    assert take_reason(path) == "RuntimeError: the next attempt"


_LAUNCHER_STAND_IN = """
import subprocess, sys
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True)  # as torchrun starts a rank
print(rank.pid, flush=True)
rank.wait()
"""

_RANK = """
import time
from daemon.training.cli import exit_with_supervisor
exit_with_supervisor({dead}, "another-host")  # the daemon runs on another machine: its pid means nothing here
print("watching", flush=True)
time.sleep(120)
"""


def test_a_rank_ignores_a_daemon_pid_of_another_host_and_dies_with_its_launcher():
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid with no process: on the daemon's host, a rank watching it would stop at once
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER_STAND_IN, _RANK.format(dead=gone.pid)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert launcher.stdout is not None
    rank = psutil.Process(int(launcher.stdout.readline()))
    try:
        assert launcher.stdout.readline() == "watching\n"
        time.sleep(1.5)  # three of the watch's polls
        assert rank.is_running() and rank.status() != psutil.STATUS_ZOMBIE
        launcher.kill()  # as the daemon kills a stalled launcher's group: the rank, in a session of its own, is left
        launcher.wait(timeout=30)
        wait_for(lambda: not rank.is_running() or rank.status() == psutil.STATUS_ZOMBIE, 30, "the rank to stop")
    finally:
        if rank.is_running():
            rank.kill()
        launcher.stdout.close()
