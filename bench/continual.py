"""Benchmark: forgetting over a stream of four different texts, with and without replay and cooldown exports.

    .venv/bin/python bench/continual.py [--chars_per_file 90000] [--out BENCHMARKS.md]

1. Four JSONL files of clearly different real text that ship with the machine, made with
   ``daemon.make_dataset`` (documents of at most 1,500 characters): Python's json and email
   sources (code), the docstrings of http, logging and urllib (prose about code), the license
   texts of ``/usr/share/common-licenses`` (legal prose) and IDLE's release notes (changelog).
   Each file's documents are shuffled (seed 0); the first ``--eval_docs`` are its held-out file
   (an ``--eval_files`` slice, never trained), the next ones up to ``--chars_per_file``
   characters its training file.
2. One starting model for every setting: the embedded model and tokenizer, bootstrapped the
   way the product does on the first file, saved once and passed as ``--model_name_or_path``, so
   every setting starts from the same weights and scores with the same tokenizer.
3. Settings, each a fresh output and status folder trained file by file with the product's code
   path (``daemon.training.run.train_file``, what ``train.py`` runs): no replay; replay at the default,
   at 9 % (the most within 1.1x the no-replay compute) and at 25 %; the default replay with
   cooldown exports (``--cooldown_fraction 0.2 --cooldown_shape 1-sqrt``); and the baseline: the
   same model trained once on all training files shuffled together, for the no-replay setting's
   number of steps (fractional ``--num_train_epochs``).
4. After every file all four held-out files are scored (``--eval_budget`` large, so each is
   scored whole); the forgetting matrix is ``status/evaluations.jsonl``. Reported after the last
   file: the mean held-out loss over the four slices, mean and max forgetting (loss now minus
   the loss right after the slice's own file, over the first three files), the gap to the union
   baseline in nats, and compute (optimizer steps, main line plus cooldown branch, and seconds).
   The forgetting matrices are plotted into ``bench/continual_forgetting.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, write_section  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCES = {  # name -> make_dataset arguments
    "code": [str(STDLIB / "json"), str(STDLIB / "email")],
    "docstrings": ["--docstrings", str(STDLIB / "http"), str(STDLIB / "logging"), str(STDLIB / "urllib")],
    "licenses": ["/usr/share/common-licenses"],
    "idle-news": ["--glob", "*.txt", str(STDLIB / "idlelib")],
}
COMMON = [
    "--max_seq_length", "128", "--per_device_train_batch_size", "8", "--learning_rate", "2e-3",
    "--warmup_steps", "10", "--eval_fraction", "0", "--max_eval_examples", "24", "--eval_budget", "1000",
    "--sample_max_new_tokens", "4", "--sample_prompts", "def ", "--save_steps", "10000", "--seed", "0",
]  # fmt: skip
COOLDOWN = ["--cooldown_fraction", "0.2", "--cooldown_shape", "1-sqrt"]
PNG = ROOT / "bench" / "continual_forgetting.png"


def make_files(work: Path, chars_per_file: int, eval_docs: int) -> list[tuple[str, Path, Path]]:
    """``(name, train.jsonl, heldout.jsonl)`` for each source, documents split at random (seed 0)."""
    out = []
    for name, args in SOURCES.items():
        raw = work / f"{name}.raw.jsonl"
        cmd = [sys.executable, "-m", "daemon.make_dataset", "--max_chars", "1500", *args, str(raw)]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        docs = [json.loads(line)["text"] for line in raw.read_text(encoding="utf-8").splitlines() if line.strip()]
        docs = [d for d in docs if len(d.strip()) > 200]
        random.Random(0).shuffle(docs)
        heldout, rest = docs[:eval_docs], docs[eval_docs:]
        chosen, size = [], 0
        for doc in rest:
            if size >= chars_per_file:
                break
            chosen.append(doc)
            size += len(doc)
        train, held = work / f"{name}.jsonl", work / f"heldout-{name}.jsonl"
        train.write_text("".join(json.dumps({"text": d}) + "\n" for d in chosen), encoding="utf-8")
        held.write_text("".join(json.dumps({"text": d}) + "\n" for d in heldout), encoding="utf-8")
        out.append((name, train, held))
        print(f"{name}: {len(chosen)} training documents ({size:,} chars), {len(heldout)} held out", flush=True)
    return out


def starting_model(first: Path, folder: Path) -> None:
    """The embedded model and tokenizer bootstrapped on ``first`` as the product does, saved to ``folder``."""
    from daemon.config import ModelArguments
    from daemon.training.model import bootstrap_model, train_tokenizer

    texts = [json.loads(line)["text"] for line in first.read_text(encoding="utf-8").splitlines()]
    model_args = ModelArguments()
    tokenizer = train_tokenizer(texts, model_args.tokenizer_vocab_size)
    bootstrap_model(tokenizer, model_args, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_setting(work: Path, name: str, files: list[Path], heldout: list[Path], extra: list[str]) -> dict:
    """Train ``files`` in order in a fresh tree with the product's code path; its history and evaluation rows."""
    from daemon.quality.forgetting import read_rows
    from daemon.training.arguments import parse_args
    from daemon.training.run import train_file

    tree = work / name
    flags = ["--output_dir", str(tree / "current_model"), "--status_dir", str(tree / "status")]
    flags += ["--dataset_cache_dir", str(work / "cache"), "--model_name_or_path", str(work / "init")]
    flags += [*COMMON, "--eval_files", *map(str, heldout), *extra]
    started, rows = time.perf_counter(), []
    for path in files:
        rows.append(train_file(parse_args(["--dataset", str(path), *flags])).as_dict())
        row = rows[-1]
        print(
            f"  {name} {path.name}: steps {row['planned_steps']} (+{row['cooldown_steps'] or 0} cooldown), "
            f"{row['examples']} examples + {row['replayed_examples']} replayed, {row['train_seconds']:.0f} s",
            flush=True,
        )
    return {
        "name": name,
        "history": rows,
        "evaluations": read_rows(tree / "status"),
        "wall": time.perf_counter() - started,
    }


def matrix(result: dict, slices: list[str]) -> list[list[float | None]]:
    """Loss of each held-out slice (columns, in file order) after each file (rows)."""
    steps = sorted({r["step"] for r in result["evaluations"]})
    by = {(r["step"], r["slice"]): r["loss"] for r in result["evaluations"]}
    return [[by.get((step, s)) for s in slices] for step in steps]


def summary(result: dict, slices: list[str]) -> dict:
    """Mean final loss, mean and max forgetting over the files before the last, compute."""
    grid = matrix(result, slices)
    final = grid[-1]
    forgetting = [final[j] - grid[j][j] for j in range(len(grid) - 1)] if len(grid) > 1 else []
    history = result["history"]
    return {
        "name": result["name"],
        "mean_loss": sum(final) / len(final),
        "forgetting_mean": sum(forgetting) / len(forgetting) if forgetting else None,
        "forgetting_max": max(forgetting) if forgetting else None,
        "main_steps": sum(r["planned_steps"] for r in history),
        "cooldown_steps": sum(r["cooldown_steps"] or 0 for r in history),
        "seconds": sum(r["train_seconds"] + (r["cooldown_seconds"] or 0) for r in history),
        "wall": result["wall"],
        "grid": grid,
    }


def plot(summaries: list[dict], names: list[str], path: Path) -> None:
    """One heatmap per setting: loss of each held-out slice (columns) after each file (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(3.6 * len(summaries), 3.6), squeeze=False)
    values = [v for s in summaries for row in s["grid"] for v in row if v is not None]
    for ax, s in zip(axes[0], summaries, strict=True):
        grid = [[float("nan") if v is None else v for v in row] for row in s["grid"]]
        ax.imshow(grid, cmap="viridis_r", vmin=min(values), vmax=max(values), aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white")
        ax.set_title(s["name"], fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=45, fontsize=7)
        rows = names[: len(grid)] if len(grid) > 1 else ["all"]
        ax.set_yticks(range(len(grid)), [f"after {n}" for n in rows], fontsize=7)
    fig.suptitle("Held-out loss (nats/token) of each file's slice after each file", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars_per_file", type=int, default=90_000, help="Training characters per file.")
    parser.add_argument("--eval_docs", type=int, default=24, help="Held-out documents per file.")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown file to update.")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    from daemon.config import ReplayArguments

    default = ReplayArguments().replay_fraction
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        made = make_files(work, args.chars_per_file, args.eval_docs)
        names, files, heldout = [m[0] for m in made], [m[1] for m in made], [m[2] for m in made]
        starting_model(files[0], work / "init")
        slices = [f"eval:{p.name}" for p in heldout]
        # 0.09 is the most replay within 1.1x the no-replay compute: 0.09 / 0.91 = 9.9 % more examples.
        marks = {0.05: "Ibrahim et al.", 0.09: "the most within 1.1x"}

        def label(f: float) -> str:
            notes = [marks[f]] if f in marks else []
            if f == default:
                notes.append("default")
            return f"replay {f:.0%}" + (f" ({', '.join(notes)})" if notes else "")

        settings = [
            ("no replay", ["--replay_fraction", "0"]),
            *((label(f), ["--replay_fraction", str(f)]) for f in (0.05, 0.09, 0.25)),
            (f"replay {default:.0%} + cooldown 20% 1-sqrt", ["--replay_fraction", str(default), *COOLDOWN]),
        ]
        results = [summary(run_setting(work, f"s{i}", files, heldout, x), slices) for i, (_, x) in enumerate(settings)]
        for result, (label, _) in zip(results, settings, strict=True):
            result["name"] = label
        union = union_file(work, files)
        examples = sum(r["examples"] for r in _history(work / "s0"))
        epochs = results[0]["main_steps"] / -(-examples // 8)
        extra = ["--replay_fraction", "0", "--num_train_epochs", repr(epochs)]
        baseline = summary(run_setting(work, "union", [union], heldout, extra), slices)
        baseline["name"] = "union (all files shuffled, once)"
    write_report(args.out, results, baseline, names, made, time.perf_counter() - started)
    plot([*results, baseline], names, PNG)
    print(f"updated {args.out} and {PNG}")
    return 0


def _history(tree: Path) -> list[dict]:
    from daemon.store.status import read_history

    return read_history(tree / "status")


def union_file(work: Path, files: list[Path]) -> Path:
    """All training documents of ``files`` shuffled together (seed 0) into one file."""
    lines = [line for path in files for line in path.read_text(encoding="utf-8").splitlines(keepends=True)]
    random.Random(0).shuffle(lines)
    union = work / "union.jsonl"
    union.write_text("".join(lines), encoding="utf-8")
    return union


def write_report(out: Path, results: list[dict], baseline: dict, names: list[str], made: list, seconds: float) -> None:
    """The ``continual`` section of BENCHMARKS.md."""
    base_steps = results[0]["main_steps"] + results[0]["cooldown_steps"]
    lines = [
        "| setting | mean held-out loss | gap to union (nats) | forgetting mean / max (nats) "
        "| optimizer steps (main + cooldown) | vs no replay | training s |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in [*results, baseline]:
        steps = s["main_steps"] + s["cooldown_steps"]
        fgt = "-" if s["forgetting_mean"] is None else f"{s['forgetting_mean']:+.3f} / {s['forgetting_max']:+.3f}"
        lines.append(
            f"| {s['name']} | {s['mean_loss']:.3f} | {s['mean_loss'] - baseline['mean_loss']:+.3f} | {fgt} "
            f"| {s['main_steps']} + {s['cooldown_steps']} | {steps / base_steps:.2f}x | {s['seconds']:.0f} |"
        )
        print(lines[-1], flush=True)
    body = "\n".join(
        [
            "## Replay and cooldown exports over a stream of files (`bench/continual.py`)",
            "",
            f"Machine: {machine()}. Run on {time.strftime('%Y-%m-%d')} in "
            f"{seconds / 60:.1f} min. The embedded model (same bootstrap for every setting), "
            f"`{' '.join(COMMON)}`; four files in this order: {', '.join(names)} "
            "(module docstring: Python's json/email source, stdlib docstrings, `/usr/share/common-licenses`, "
            "IDLE's release notes), each with its own held-out file scored after every file. Loss is nats per token "
            "after the last file; forgetting is the loss now minus right after the slice's own file, over the "
            "first three files.",
            "",
            *lines,
            "",
            "![forgetting matrices](bench/continual_forgetting.png)",
        ]
    )
    write_section(out, "continual", body)


if __name__ == "__main__":
    sys.exit(main())
