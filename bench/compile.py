"""Benchmark: does ``--torch_compile`` pay on this machine? ``train.py`` compiled against eager, in one go.

    .venv/bin/python bench/compile.py [--repeats 2]

1. Data: Python's own ``json`` and ``email`` packages as one ``{"text"}`` JSONL file (the first
   file of ``make demo``); model: the embedded default model, bootstrapped once by ``train.py`` on
   a slice of that file and exported; every run starts from it. Batch 8 x 256 tokens, one pass.
2. Runs, whole processes: the defaults (eager; ``--grad_workers auto`` decides); the stock step
   eager (``--grad_workers 0``); ``--torch_compile True`` with an empty inductor cache (cold: the
   first file of a model shape); then, ``repeats`` times alternated, the stock step eager and
   compiled with the cache the cold run filled (warm: every later file).
3. Reported: wall seconds, seconds inside ``Trainer.train`` (``train_seconds``: compiling
   happens in the first steps), the steady training rate (tokens per second between the 10th
   and the last logged step, from ``status/loss.jsonl``: compiling excluded) and the compile
   cost (``train_seconds`` minus the file's tokens at that steady rate).

``torch.compile`` pays for a file when ``(1 - 1/speedup) x training seconds > compile cost``:
the reading under the table says for which files that holds here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, write_section  # noqa: E402
from bench.end_to_end import run, stdlib_file_and_base  # noqa: E402

SHARED = ["--max_seq_length", "256", "--per_device_train_batch_size", "8", "--logging_steps", "10"]
COMPILE = ["--grad_workers", "0", "--torch_compile", "True"]
STEADY_FROM = 10  # the first logged step of the steady rate: compiling and warm-up happen before it


@dataclass
class Run:
    """One ``train.py`` process: wall and training seconds, trained tokens, the steady tokens/s."""

    wall: float
    train_seconds: float
    tokens: int
    steady: float
    workers: int

    @property
    def compile_seconds(self) -> float:
        """Training seconds beyond the steady rate's: compiling, and the first steps' warm-up."""
        return self.train_seconds - self.tokens / self.steady


def steady_rate(loss_points: list[dict], tokens: int, steps: int) -> float:
    """Tokens per second between the logged step :data:`STEADY_FROM` and the last logged step.

    Each point's ``tokens_per_second`` is the file's tokens so far over its seconds so far, so
    step ``s`` was reached ``s x (tokens / steps) / tokens_per_second(s)`` seconds in.
    """
    per_step = tokens / steps
    points = [p for p in loss_points if p["step"] >= STEADY_FROM]
    first, last = points[0], points[-1]
    at = {p["step"]: p["step"] * per_step / p["tokens_per_second"] for p in (first, last)}
    return (last["step"] - first["step"]) * per_step / (at[last["step"]] - at[first["step"]])


def product(work: Path, data: Path, base: Path, name: str, extra: list[str], inductor: Path) -> Run:
    """Run ``train.py`` once on ``data`` from ``base``, inductor's cache in ``inductor``."""
    out = work / name
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
    wall = run(
        [sys.executable, str(ROOT / "train.py"), "--dataset", str(data), "--model_name_or_path", str(base),
         "--output_dir", str(out / "model"), "--status_dir", str(out / "status"), *SHARED, *extra],
        cwd=work,
        env=env,
    )  # fmt: skip
    row = json.loads((out / "status" / "history.jsonl").read_text().splitlines()[-1])
    points = [json.loads(line) for line in (out / "status" / "loss.jsonl").read_text().splitlines()]
    workers = json.loads((out / "status" / "training_status.json").read_text())["gradient_guard"]["workers"]
    steady = steady_rate(points, row["tokens"], row["planned_steps"])
    print(f"{name}: wall {wall:.1f} s, train {row['train_seconds']:.1f} s, steady {steady:,.0f} tok/s", flush=True)
    return Run(wall, row["train_seconds"], row["tokens"], steady, workers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="Alternating eager/compiled warm repeats.")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown file to update.")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data, base = stdlib_file_and_base(work, ("json", "email"), seed_lines=20)
        inductor = work / "inductor"
        runs: dict[str, list[Run]] = {"defaults": [], "stock": [], "cold": [], "warm": []}
        runs["defaults"].append(product(work, data, base, "defaults", [], inductor))
        runs["stock"].append(product(work, data, base, "stock0", ["--grad_workers", "0"], inductor))
        runs["cold"].append(product(work, data, base, "cold", COMPILE, inductor))
        for i in range(args.repeats):
            runs["warm"].append(product(work, data, base, f"warm{i}", COMPILE, inductor))
            runs["stock"].append(product(work, data, base, f"stock{i + 1}", ["--grad_workers", "0"], inductor))

    def median(key: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs[key])

    workers = runs["defaults"][0].workers
    labels = {
        "defaults": f"defaults, eager ({f'{workers} gradient workers' if workers else 'stock step'})",
        "stock": "stock step, eager (`--grad_workers 0`)",
        "cold": "`--torch_compile True`, empty cache (a shape's first file)",
        "warm": "`--torch_compile True`, cache filled (every later file)",
    }
    stock_rate = median("stock", "steady")
    rows = [
        "| run | runs | wall s | train s | steady tokens/s | vs stock step, eager | compile and warm-up s |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, label in labels.items():
        rows.append(
            f"| {label} | {len(runs[key])} | {median(key, 'wall'):.1f} | {median(key, 'train_seconds'):.1f} "
            f"| {median(key, 'steady'):,.0f} | **{median(key, 'steady') / stock_rate:.2f}x** "
            f"| {median(key, 'compile_seconds'):.1f} |"
        )
    speedup = median("warm", "steady") / max(median("defaults", "steady"), stock_rate)
    extra_warm = median("warm", "compile_seconds") - median("stock", "compile_seconds")
    extra_cold = median("cold", "compile_seconds") - median("stock", "compile_seconds")
    if speedup > 1:
        pays = (
            f"Compiled, the steady rate is {speedup:.2f}x the best eager one: compiling pays for files of over "
            f"{extra_warm / (1 - 1 / speedup) / 60:.1f} minutes of training with a filled cache and "
            f"{extra_cold / (1 - 1 / speedup) / 60:.1f} minutes for a shape's first file."
        )
    else:
        pays = (
            f"Compiled, the steady rate is {speedup:.2f}x the best eager one: no file is long enough for "
            "compiling to pay on this machine, so `--torch_compile` stays off by default here."
        )
    body = "\n".join(
        [
            "## `--torch_compile` against eager (`bench/compile.py`)",
            "",
            f"Machine: {machine()}. Run on {time.strftime('%Y-%m-%d')} in "
            f"{(time.perf_counter() - started) / 60:.1f} min. `train.py` on one file (Python's json and email "
            f"packages, {runs['defaults'][0].tokens:,} trained tokens, one pass, batch 8 x 256) from the same "
            "embedded model (4.2M parameters), whole processes, medians. The steady rate is measured from "
            f"the {STEADY_FROM}th logged step to the last, so it leaves compiling out; the last column is "
            "the training seconds beyond that rate: compiling plus the first steps' warm-up (the eager "
            "stock step has warm-up too).",
            "",
            *rows,
            "",
            f"Compiling costs {extra_cold:.0f} s more than eager's warm-up with an empty cache and "
            f"{extra_warm:.0f} s with the cache filled. {pays}",
        ]
    )
    write_section(args.out, "compile", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
