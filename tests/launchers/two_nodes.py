"""Two ``torchrun`` agents on loopback, each standing in for one node: a ``--launcher`` for the tests.

``--launcher "python tests/launchers/two_nodes.py"``: the daemon appends ``-m daemon train ...``,
which this script hands to two agents of one c10d rendezvous, as two machines would run them::

    torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT \
        --rdzv-id ID --max-restarts 0 --shutdown-timeout 60 -m daemon train ...

The first agent hosts the rendezvous store (``is_host=1``), the second joins it. Both must have
joined within ``--rdzv-conf join_timeout`` (:data:`JOIN_TIMEOUT`), so a rendezvous never waits
for ever. The script exits 0 when both agents do; when one fails it stops the other (SIGTERM, which
the agent passes to its rank; SIGKILL after :data:`STOP_GRACE` seconds) and exits with the first
failure's code, as ``srun --kill-on-bad-exit`` does on a cluster (docs/distributed.md).

Environment: ``TWO_NODES_PER_NODE`` ranks per agent (default 1). Signals sent to this process's
group (the daemon's SIGTERM, a terminal's Ctrl-C) reach the agents directly: they share it; after
one, the script only waits for both agents (a second SIGTERM would cut short an agent's wait for its
ranks' checkpoint).
Standard library only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

JOIN_TIMEOUT = 60  # seconds for both agents to join the rendezvous
SHUTDOWN_TIMEOUT = 60  # seconds an agent gives its ranks after passing on a SIGTERM (torchrun's default: 30)
STOP_GRACE = 75.0  # seconds the surviving agent has to stop its rank, then SIGKILL
POLL = 0.2


def free_port() -> int:
    """A TCP port free on loopback now (the rendezvous store binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agent_command(node: int, port: int, rdzv_id: str, per_node: int, child: list[str]) -> list[str]:
    """The ``torchrun`` command line of agent ``node`` (0 hosts the rendezvous store)."""
    conf = f"join_timeout={JOIN_TIMEOUT},is_host={1 if node == 0 else 0}"
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        str(per_node),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        rdzv_id,
        "--rdzv-conf",
        conf,
        "--local-addr",
        "127.0.0.1",
        "--max-restarts",
        "0",
        "--shutdown-timeout",
        str(SHUTDOWN_TIMEOUT),
        *child,
    ]


def stop(agent: subprocess.Popen[bytes]) -> None:
    """SIGTERM one agent (it stops its ranks), SIGKILL it after :data:`STOP_GRACE` seconds; reap it."""
    if agent.poll() is not None:
        return
    agent.send_signal(signal.SIGTERM)
    try:
        agent.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()


def exit_code(returncode: int) -> int:
    """A shell's exit status for a child's return code (``128 + N`` for a child killed by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def main(child: list[str]) -> int:
    """Run both agents to their end; returns 0, or the exit status of the first agent that failed."""
    port, rdzv_id = free_port(), f"two-nodes-{uuid.uuid4().hex[:12]}"
    per_node = int(os.environ.get("TWO_NODES_PER_NODE", "1"))
    agents = [subprocess.Popen(agent_command(node, port, rdzv_id, per_node, child)) for node in (0, 1)]
    stopping: list[int] = []

    def on_stop(signum: int, _frame: object) -> None:
        stopping.append(signum)  # the agents got it too (one process group): they stop their ranks

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    try:
        while True:
            codes = [agent.poll() for agent in agents]
            failed = [code for code in codes if code]
            if failed and stopping:  # no second signal: it would cut short an agent's wait for its ranks' save
                for agent in agents:
                    agent.wait()
                return exit_code(failed[0])
            if failed:
                print(f"two_nodes: an agent exited with {failed[0]}: stopping the other", file=sys.stderr, flush=True)
                for agent in agents:
                    stop(agent)
                return exit_code(failed[0])
            if all(code == 0 for code in codes):
                return 0
            time.sleep(POLL)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
