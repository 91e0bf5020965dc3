"""``srun`` as the launcher, on a one-host Slurm cluster (Debian's slurm-wlm): not part of ``make test``.

``make slurm-test`` (as root) starts the cluster with tests/slurm/start.sh and runs this file. Two Slurm
tasks on the one node stand in for two nodes; each runs examples/slurm/torchrun_node.sh, the per-node
half of the launcher a cluster user gives (docs/distributed.md, "Multi-node"). Without ``srun``, or
with no cluster answering, the test fails and says how to start one: it never skips.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
from helpers import REPO, daemon_argv, stdlib_documents, write_jsonl

from daemon.store.checkpoints import latest_complete_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.timeout(600)]  # minutes under load

NODE_SCRIPT = REPO / "examples" / "slurm" / "torchrun_node.sh"
DEFAULT_CONF = "/tmp/slurm-test/slurm.conf"  # where tests/slurm/start.sh writes it


def _slurm_env() -> dict[str, str]:
    """The environment for Slurm's clients: ``SLURM_CONF`` of the one-host cluster; fails the test without one."""
    if shutil.which("srun") is None:
        pytest.fail("srun is not installed: run `make slurm-test` as root (tests/slurm/start.sh installs slurm-wlm)")
    env = {**os.environ, "SLURM_CONF": os.environ.get("SLURM_CONF", DEFAULT_CONF)}
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
    if state.returncode != 0 or "idle" not in state.stdout.split():
        why = (state.stderr or state.stdout).strip()
        pytest.fail(f"no idle Slurm node ({why}): start the one-host cluster with tests/slurm/start.sh")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_srun_starts_one_torchrun_agent_a_node_and_the_file_trains_end_to_end(tree):
    env = _slurm_env()
    env.update(
        PYTHONUNBUFFERED="1",
        TORCHRUN=f"{sys.executable} -m torch.distributed.run",
        NPROC_PER_NODE="1",
        RDZV_PORT=str(_free_port()),
        RDZV_JOIN_TIMEOUT="60",
    )
    part = write_jsonl(tree.inbox / ".1-a.jsonl.part", [{"text": d} for d in stdlib_documents(limit=16)])
    part.rename(tree.inbox / "1-a.jsonl")
    launcher = f"srun --nodes 1 --ntasks 2 --kill-on-bad-exit=1 {NODE_SCRIPT}"
    argv = daemon_argv(tree, "--once", "--launcher", launcher, replay_fraction=0, forward_transfer=False)
    result = subprocess.run(
        [sys.executable, *argv], cwd=tree.root, env=env, capture_output=True, text=True, timeout=540
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (row,) = tree.history()
    assert row["outcome"] == "done"
    assert row["planned_steps"] == math.ceil(row["examples"] / 8)  # 4 per device x 1 accumulation x 2 tasks
    assert (row["start_step"], row["end_step"]) == (0, row["planned_steps"])
    assert latest_complete_checkpoint(tree.output, set_aside=False).global_step == row["end_step"]
    assert json.loads((tree.output / "export.json").read_text())["global_step"] == row["end_step"]
    assert (tree.inbox / "done" / "1-a.jsonl").exists()
