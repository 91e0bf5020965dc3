"""Benchmark: the evaluation suite's share of a file's wall time, with 1, 10 and 50 slices.

    .venv/bin/python bench/evaluation.py [--slices 1 10 50]

1. Train a seed file with ``train.py`` and its defaults (the embedded model), so a running
   model exists; keep that tree.
2. For each suite size N: copy the tree, add N - 1 held-out slices to ``status/eval_suite/``
   (64 pieces of about 900 characters of Python's standard library each, as a
   ``--max_eval_examples 64`` held-out slice holds), then train the same measured file (about a
   minute of training: Python's json, email, http and logging packages) with ``train.py``
   and its defaults (``--eval_budget 0.1``). The file's own held-out slice is the N-th.
3. Report, from its ``history.jsonl`` row and status, the evaluation's seconds (reading the
   slices and scoring them), the budget, the examples scored per slice, and the evaluation's
   share of the file's wall time (``eval_seconds / wall_seconds``) and of its training time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, write_section  # noqa: E402
from daemon.training.arguments import cpu_has_fast_bf16  # noqa: E402

MEASURED = ("json", "email", "http", "logging")
FILLER = ("asyncio", "unittest", "xml")  # text of the synthetic slices
PIECE_CHARS, PIECES = 900, 64


def make_jsonl(packages: tuple[str, ...], out: Path) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    args = [*(str(stdlib / p) for p in packages), str(out)]
    subprocess.run([sys.executable, "-m", "daemon.make_dataset", *args], cwd=ROOT, check=True, capture_output=True)


def train(tree: Path, dataset: Path) -> None:
    flags = ["--output_dir", str(tree / "current_model"), "--status_dir", str(tree / "status")]
    flags += ["--dataset_cache_dir", str(tree.parent / "cache")]
    result = subprocess.run(
        [sys.executable, "train.py", "--dataset", str(dataset), *flags], cwd=ROOT, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"train.py failed on {dataset.name}:\n{result.stderr[-3000:]}")


def warm_cache(tree: Path, dataset: Path) -> None:
    """Tokenize ``dataset`` once with the seed's tokenizer, so that no measured run pays for it."""
    from daemon.config import DataArguments
    from daemon.store.jsonl import load_records, scan_jsonl
    from daemon.training.data import prepare_datasets
    from daemon.training.model import load_pretrained

    _, tokenizer = load_pretrained(tree / "current_model")
    args = DataArguments(dataset=str(dataset), dataset_cache_dir=str(tree.parent / "cache"))
    report = scan_jsonl(dataset)
    prepare_datasets(load_records(report, args), report.shape, tokenizer, args, seed=42)


def add_slices(tree: Path, count: int, pool: list[str], step: int) -> None:
    """``count`` synthetic held-out slices of :data:`PIECES` pieces each, named as done files' slices."""
    folder = tree / "status" / "eval_suite"
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        pieces = [pool[(n * PIECES + i) % len(pool)] for i in range(PIECES)]
        lines = "".join(json.dumps({"text": p}) + "\n" for p in pieces)
        (folder / f"{max(0, step - n):08d}-synthetic-{n:02d}.jsonl").write_text(lines, encoding="utf-8")


def measure(work: Path, seed_tree: Path, measured: Path, pool: list[str], slices: int) -> dict:
    tree = work / f"suite-{slices}"
    shutil.copytree(seed_tree, tree)
    step = json.loads((tree / "current_model" / "export.json").read_text())["global_step"]
    add_slices(tree, slices - 1, pool, step)
    started = time.perf_counter()
    train(tree, measured)
    run_seconds = time.perf_counter() - started
    row = json.loads((tree / "status" / "history.jsonl").read_text().splitlines()[-1])
    evaluation = json.loads((tree / "status" / "training_status.json").read_text())["evaluation"]
    shutil.rmtree(tree)
    return {"slices": slices, "row": row, "evaluation": evaluation, "process_seconds": run_seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[1, 10, 50], help="Suite sizes to measure.")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown file to update.")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        measured, filler = work / "measured.jsonl", work / "filler.jsonl"
        make_jsonl(MEASURED, measured)
        make_jsonl(FILLER, filler)
        text = "".join(json.loads(line)["text"] for line in filler.read_text().splitlines())
        pool = [text[i : i + PIECE_CHARS] for i in range(0, len(text) - PIECE_CHARS, PIECE_CHARS)]
        seed_tree, seed = work / "seed", work / "seed.jsonl"
        seed.write_text("".join(measured.read_text().splitlines(keepends=True)[:6]))
        for folder in ("status", "current_model"):
            (seed_tree / folder).mkdir(parents=True)
        train(seed_tree, seed)
        warm_cache(seed_tree, measured)
        results = [measure(work, seed_tree, measured, pool, n) for n in args.slices]
    rows = [
        "| slices | examples scored per slice | evaluation (s) | budget (s) | training (s) | file wall (s) "
        "| evaluation / wall | evaluation / training |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        row, ev = r["row"], r["evaluation"]
        share, of_training = row["eval_seconds"] / row["wall_seconds"], row["eval_seconds"] / row["train_seconds"]
        rows.append(
            f"| {r['slices']} | {ev['examples_per_slice'] if r['slices'] > 1 else '(own slice only)'} "
            f"| {row['eval_seconds']:.1f} | {ev['budget_seconds']:.1f} "
            f"| {row['train_seconds']:.1f} | {row['wall_seconds']:.1f} | **{share:.1%}** | {of_training:.1%} |"
        )
        print(rows[-1], flush=True)
    row = results[0]["row"]
    precision = "on: bf16 autocast" if cpu_has_fast_bf16() else "off: fp32"
    body = "\n".join(
        [
            "## The evaluation suite's cost (`bench/evaluation.py`)",
            "",
            f"Machine: {machine()} (so `--bf16` defaults to {precision}). "
            f"Run on {time.strftime('%Y-%m-%d')} in "
            f"{(time.perf_counter() - started) / 60:.1f} min. `train.py` with its defaults (embedded model, "
            f"`--eval_budget 0.1`) on one file of {row['tokens']:,} tokens, {row['planned_steps']} optimizer steps "
            f"(Python's {', '.join(MEASURED)} packages), continuing a seed model; the suite holds the file's own "
            f"held-out slice plus N - 1 slices of {PIECES} pieces of about {PIECE_CHARS} characters each.",
            "",
            *rows,
            "",
            "The file's own held-out slice is scored whole (its `eval_loss`), every other slice on the first k "
            "examples of its fixed subset, k = 1, 2, 4, 8... as the budget allows, never fewer than 1; `evaluation` "
            "includes reading the slices.",
        ]
    )
    write_section(args.out, "evaluation", body)
    print(f"updated {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
