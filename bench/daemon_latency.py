"""Benchmark: what the daemon costs around training: drop-to-first-step latency and wall / train time.

    .venv/bin/python bench/daemon_latency.py [--packages json email ...]

1. Start ``python -m daemon`` with its defaults on an empty project tree and drop a
   small seed file, so the running model exists (the steady state of a daemon); then
   leave it idle for ``IDLE_SECONDS``, as a daemon between drops is.
2. Drop a file of about a minute of training on an AVX512-BF16 CPU (Python's json, email,
   http, logging, xml, urllib, asyncio and unittest packages; ``--packages`` picks others:
   json, email, http and logging are about a minute in fp32 on an AVX2 CPU), renamed into
   the inbox as a writer should.
3. Read the daemon's log as it comes: the drop-to-first-step latency is the time
   from the rename to the child's progress line of the file's first step (logged after the optimizer
   step); the file's wall time runs from the rename to its ``history.jsonl`` row.
   Pure training time is the row's ``train_seconds`` (the Trainer's ``train_runtime``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, write_section  # noqa: E402

PACKAGES = ("json", "email", "http", "logging", "xml", "urllib", "asyncio", "unittest")
IDLE_SECONDS = 10  # between the seed's row and the drop: time for the prestarted process's imports
FIRST_STEP = "(1/"  # the child's progress line "step N/M (1/K of this file)", logged after the optimizer step


class LogWatch:
    """Timestamps (``time.perf_counter``) of the log lines containing each awaited text."""

    def __init__(self, stream) -> None:
        self.seen: dict[str, list[float]] = {}
        self.awaited: list[str] = []
        self.lines: list[str] = []
        self.timeline: list[tuple[float, str]] = []  # every line with its time, for --log
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def expect(self, text: str) -> None:
        with self._lock:
            self.awaited.append(text)

    def _read(self, stream) -> None:
        for line in stream:
            now = time.perf_counter()
            with self._lock:
                self.lines = [*self.lines[-60:], line]
                self.timeline.append((now, line))
                for text in self.awaited:
                    if text in line:
                        self.seen.setdefault(text, []).append(now)

    def wait(self, text: str, timeout: float, after: float = 0.0) -> float:
        """The first line with ``text`` seen after ``after`` (a ``perf_counter`` time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                later = [t for t in self.seen.get(text, []) if t > after]
                if later:
                    return later[0]
            time.sleep(0.01)
        raise SystemExit(f"no '{text}' in the daemon's log after {timeout:.0f} s:\n{''.join(self.lines)}")


def drop(inbox: Path, source: Path, name: str) -> float:
    """Copy ``source`` into the inbox as ``name`` by a rename; the time of the rename."""
    part = inbox / f".{name}.part"
    part.write_bytes(source.read_bytes())
    os.replace(part, inbox / name)
    return time.perf_counter()


def history_rows(status: Path) -> list[dict]:
    path = status / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_rows(status: Path, count: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(history_rows(status)) >= count:
            return time.perf_counter()
        time.sleep(0.02)
    raise SystemExit(f"no history row {count} after {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES), help="stdlib packages in the file.")
    parser.add_argument("--log", type=Path, help="write the daemon's log here, each line timed from the drop.")
    args = parser.parse_args()
    packages = args.packages
    out = ROOT / "BENCHMARKS.md"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for folder in ("inbox", "status", "current_model"):
            (work / folder).mkdir()
        data = work / "stdlib.jsonl"
        subprocess.run(
            [sys.executable, "-m", "daemon.make_dataset", *(str(stdlib / p) for p in packages), str(data)],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        seed = work / "seed.jsonl"
        seed.write_text("".join(data.read_text().splitlines(keepends=True)[:20]))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        daemon = subprocess.Popen(
            [sys.executable, "-m", "daemon"],
            cwd=work,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        log = LogWatch(daemon.stdout)
        dropped = 0.0  # the file's drop, once made: the zero of --log's times
        try:
            drop(work / "inbox", seed, "seed.jsonl")
            wait_rows(work / "status", 1, timeout=600)
            time.sleep(IDLE_SECONDS)  # the daemon is idle again, waiting on the inbox
            log.expect(FIRST_STEP)  # from now on: the seed's own step lines are behind us
            dropped = drop(work / "inbox", data, "stdlib.jsonl")
            first_step = log.wait(FIRST_STEP, timeout=600) - dropped
            finished = wait_rows(work / "status", 2, timeout=1200) - dropped
            row = history_rows(work / "status")[-1]
            # A queue: two files dropped together; the second trains in the process prestarted
            # while the first trained, so the gap between them holds no start-up.
            lines = data.read_text().splitlines(keepends=True)
            queue = [work / "first-half.jsonl", work / "second-half.jsonl"]
            queue[0].write_text("".join(lines[: len(lines) // 2]))
            queue[1].write_text("".join(lines[len(lines) // 2 :]))
            log.expect("training in the prestarted process")
            queued = drop(work / "inbox", queue[0], queue[0].name)
            drop(work / "inbox", queue[1], queue[1].name)
            first_done = wait_rows(work / "status", 3, timeout=1200)
            second_step = log.wait(FIRST_STEP, timeout=600, after=first_done) - first_done
            queue_wall = wait_rows(work / "status", 4, timeout=1200) - queued
            queue_rows = history_rows(work / "status")[-2:]
            prestarted = len(log.seen.get("training in the prestarted process", []))
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=120)
            if args.log:
                args.log.write_text("".join(f"{t - dropped:9.2f} {line}" for t, line in log.timeline))
    if any(r["outcome"] != "done" for r in [row, *queue_rows]):
        raise SystemExit(f"a file failed: {[row, *queue_rows]}")
    ratio = finished / row["train_seconds"]
    queue_train = sum(r["train_seconds"] for r in queue_rows)
    body = "\n".join(
        [
            "## The daemon around training (`bench/daemon_latency.py`)",
            "",
            f"Machine: {machine()}. Run on {time.strftime('%Y-%m-%d')}. `python -m daemon` with its "
            f"defaults, a running model (a seed file trained first), {IDLE_SECONDS} s idle, then one file renamed "
            "into the inbox: "
            f"{row['tokens']:,} tokens, {row['planned_steps']} optimizer steps (Python's "
            f"{', '.join(packages)} packages).",
            "",
            "| measure | result |",
            "|---|---|",
            f"| drop (rename into `inbox/`) to the first optimizer step | **{first_step:.1f} s** |",
            f"| drop to the file's `history.jsonl` row (wall) | {finished:.1f} s |",
            f"| pure training (`train_seconds`, the Trainer's `train_runtime`) | {row['train_seconds']:.1f} s |",
            f"| wall / pure training | **{ratio:.2f}** |",
            f"| a queue of two files (its halves, {queue_rows[0]['planned_steps']} and "
            f"{queue_rows[1]['planned_steps']} steps) dropped together: wall / pure training | "
            f"**{queue_wall / queue_train:.2f}** ({queue_wall:.1f} s / {queue_train:.1f} s) |",
            f"| the first file's `history.jsonl` row to the second's first optimizer step | {second_step:.1f} s |",
            f"| files of the queue trained in a prestarted process | {prestarted} of 2 |",
        ]
    )
    write_section(out, "daemon", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
